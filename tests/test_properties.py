"""Properties that must hold for any input (hypothesis picks shapes, options and seeds)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liftplace
from testing import DEVICES, backend, backends

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, groupings=("global", "error", "patch")):
    grouping = draw(st.sampled_from(groupings))
    B, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if grouping == "patch":
        p = draw(st.integers(2, 3))
        H, W = p * draw(st.integers(1, 3)), p * draw(st.integers(1, 3))
        group_size = p * p
    else:
        H, W = draw(st.integers(1, 7)), draw(st.integers(2, 7))
        group_size = draw(st.integers(2, H * W))
    opts = dict(grouping=grouping, group_size=group_size,
                norm=draw(st.sampled_from(["l1", "l2"])),
                reduction=draw(st.sampled_from(["sum", "mean"])),
                weight=draw(st.sampled_from(["adaptive", "constant"])),
                parts=draw(st.sampled_from(["both", "coarse", "fine"])),
                coarse_weight=draw(st.sampled_from(["constant", "anneal"])))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    return (B, C, H, W), opts, seed, scale


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases())
def test_loss_is_non_negative_and_reproducible(device, case):
    shape, opts, seed, scale = case
    x = (scale * randn(shape, seed)).float().to(device)
    y = (scale * randn(shape, seed + 1)).float().to(device)
    for name in backends(device):
        with backend(name):
            first = liftplace.lift_place_loss(x, y, **opts)
            assert first.item() >= 0
            assert torch.equal(first, liftplace.lift_place_loss(x, y, **opts))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases(), alpha=st.floats(0.1, 5.0), beta=st.floats(-3.0, 3.0))
def test_affine_teacher_recovers_coefficients(device, case, alpha, beta):
    shape, opts, seed, scale = case
    x = (scale * randn(shape, seed)).to(device)
    y = alpha * x + beta
    for name in backends(device):
        with backend(name):
            # eps far below any group's variance (two close draws can give vx ~ 1e-10, where
            # eps=1e-14 alone moves the slope by 1e-4 relative): the fit must then be exact.
            slope, intercept = liftplace.fit_groups(x, y, group_size=opts["group_size"],
                                                    grouping=opts["grouping"], eps=1e-30)
            torch.testing.assert_close(slope, torch.full_like(slope, alpha), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(intercept, torch.full_like(intercept, beta),
                                       rtol=1e-6, atol=1e-6 * max(1.0, scale * alpha))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases())
def test_identical_outputs_give_zero_loss(device, case):
    shape, opts, seed, _ = case
    x = randn(shape, seed).to(device).requires_grad_()
    y = x.detach().clone()
    for name in backends(device):
        with backend(name):
            # eps far below any group's variance: with eps=1e-12, two close draws (vx ~ 1e-6)
            # legitimately give a = 1 - 1e-6 and a gradient of that size.
            loss = liftplace.lift_place_loss(x, y, eps=1e-30, **{**opts, "weight": "constant"})
            assert loss.item() == pytest.approx(0.0, abs=1e-8)
            if opts["norm"] == "l2":
                # L1's subgradient does not vanish at its minimum; L2's gradient does.
                (g,) = torch.autograd.grad(loss, [x])
                assert g.abs().max().item() < 1e-7


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=cases(groupings=("global", "error")))
def test_permuting_elements_within_rows_keeps_the_loss(device, case):
    shape, opts, seed, scale = case
    x = (scale * randn(shape, seed)).to(device)
    y = (scale * randn(shape, seed + 1)).to(device)
    B, C = shape[:2]
    perm = torch.randperm(shape[2] * shape[3], generator=torch.Generator().manual_seed(seed))
    xp = x.reshape(B, C, -1)[..., perm].reshape(shape)
    yp = y.reshape(B, C, -1)[..., perm].reshape(shape)
    for name in backends(device):
        with backend(name):
            a = liftplace.lift_place_loss(x, y, **opts)
            b = liftplace.lift_place_loss(xp, yp, **opts)
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
