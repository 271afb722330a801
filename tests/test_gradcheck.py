"""torch.autograd.gradcheck in float64 for every grouping, norm, reduction and part."""

import pytest
import torch

import liftplace
from testing import COARSE_WEIGHTS, DEVICES, GROUPINGS, NORMS, PARTS, REDUCTIONS, backend, backends


def separated_pair(shape, device, seed):
    """Inputs whose errors (y - x)^2 are far apart, so gradcheck's perturbations never
    reorder the ranking (the loss is piecewise smooth across rank changes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    n = x.numel()
    gaps = 0.05 * (torch.randperm(n, generator=g).double() + 1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    y = 0.7 * x + 0.2 + (gaps * sign).reshape(shape)
    # Keep the affine fit away from |a - 1| = 0 and |b| = 0, where L1 has a kink.
    return (x.to(device).requires_grad_(), y.to(device).requires_grad_())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("parts", PARTS)
def test_gradcheck(device, grouping, norm, reduction, parts):
    x, y = separated_pair((2, 2, 4, 6), device, seed=1)
    # A fixed weight: the adaptive one is detached by definition, so finite differences
    # would see its dependence on the inputs while the analytic gradient (correctly) does not.
    opts = dict(group_size=4, grouping=grouping, norm=norm, reduction=reduction, parts=parts,
                weight="linear", step=1, total_steps=3)
    for name in backends(device):
        with backend(name):
            assert torch.autograd.gradcheck(lambda a, b: liftplace.lift_place_loss(a, b, **opts), (x, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("coarse_weight", COARSE_WEIGHTS)
def test_gradcheck_coarse_weight(device, grouping, coarse_weight):
    x, y = separated_pair((2, 1, 4, 4), device, seed=2)
    opts = dict(group_size=4, grouping=grouping, coarse_weight=coarse_weight, weight="cosine",
                step=2, total_steps=5)
    for name in backends(device):
        with backend(name):
            assert torch.autograd.gradcheck(lambda a, b: liftplace.lift_place_loss(a, b, **opts), (x, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck_fit_groups(device, grouping):
    x, y = separated_pair((1, 2, 4, 4), device, seed=3)
    for name in backends(device):
        with backend(name):
            assert torch.autograd.gradcheck(
                lambda a, b: liftplace.fit_groups(a, b, group_size=4, grouping=grouping), (x, y))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_stats_paths(device):
    # Every per-row statistic is differentiable in the kernels, including those only the
    # stats dict exposes; check them through a loss that uses them all.
    x, y = separated_pair((2, 1, 4, 4), device, seed=4)

    def f(a, b):
        loss, stats = liftplace.lift_place_loss(a, b, group_size=4, weight="constant", return_stats=True)
        slope, intercept = liftplace.fit_groups(a, b, group_size=4)
        return loss + (slope.square().sum() - intercept.sum()) * 0.3

    for name in backends(device):
        with backend(name):
            assert torch.autograd.gradcheck(f, (x, y))
