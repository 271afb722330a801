"""Values and gradients of lift_place_loss against an independent float64 evaluation."""

import zlib

import pytest
import torch

import liftplace
from testing import (COARSE_WEIGHTS, DEVICES, GROUPINGS, NORMS, PARTS, REDUCTIONS, SHAPES, WEIGHTS,
                     backend, backends, fits, make_pair, naive_loss)


def assert_matches(loss, gx, gy, ref, *, rtol, grad_rtol):
    ref_loss, ref_gx, ref_gy = ref
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=rtol, atol=rtol * 1e-3)
    for g, r in ((gx, ref_gx), (gy, ref_gy)):
        assert torch.isfinite(g).all()
        # Element errors relative to the gradient's scale: tiny entries carry absolute error.
        scale = r.abs().max().item() + 1e-30
        torch.testing.assert_close(g.double().cpu(), r, rtol=grad_rtol, atol=grad_rtol * scale)


def run(x, y, **opts):
    loss = liftplace.lift_place_loss(x, y, **opts)
    gx, gy = torch.autograd.grad(loss, [x, y])
    return loss, gx, gy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,group_size", SHAPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64_oracle(device, dtype, shape, group_size, grouping, norm, reduction):
    if not fits(shape, group_size, grouping):
        pytest.skip("shape does not tile into square patches")
    opts = dict(group_size=group_size, grouping=grouping, norm=norm, reduction=reduction)
    seed = zlib.crc32(repr((shape, group_size, grouping, norm, reduction)).encode())
    x, y = make_pair(shape, dtype, device, seed=seed)
    ref = naive_loss(x, y, **opts)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in backends(device):
        with backend(name):
            assert_matches(*run(x, y, **opts), ref, rtol=rtol, grad_rtol=rtol * 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("coarse_weight", COARSE_WEIGHTS)
def test_weights_and_parts(device, weight, parts, coarse_weight):
    opts = dict(group_size=8, grouping="error", weight=weight, parts=parts,
                coarse_weight=coarse_weight, step=3, total_steps=10)
    # Closely related outputs so the adaptive weight is strictly between 0 and 1.
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    x = base.float().to(device).requires_grad_()
    y = (1.05 * base + 0.02 + 0.05 * torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)).float().to(device).requires_grad_()
    ref = naive_loss(x, y, **opts)
    for name in backends(device):
        with backend(name):
            loss, stats = liftplace.lift_place_loss(x, y, return_stats=True, **opts)
            w = stats["weight"].item()
            if weight == "adaptive":
                assert 0.0 < w < 1.0
            expected_cw = 1.0 - w if coarse_weight == "anneal" else 1.0
            assert stats["coarse_weight"].item() == pytest.approx(expected_cw)
            gx, gy = torch.autograd.grad(loss, [x, y])
            assert_matches(loss, gx, gy, ref, rtol=2e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_low_precision_inputs(device, dtype, grouping):
    # The oracle sees the same rounded inputs; what remains is float32 accumulation in the
    # loss and the rounding of the gradient to the input dtype.
    x, y = make_pair((2, 3, 8, 8), dtype, device, seed=11)
    opts = dict(group_size=16, grouping=grouping)
    ref_loss, ref_gx, ref_gy = naive_loss(x, y, **opts)
    eps_in = torch.finfo(dtype).eps
    for name in backends(device):
        with backend(name):
            loss, gx, gy = run(x, y, **opts)
            assert loss.dtype == torch.float32 and gx.dtype == dtype
            torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
            for g, r in ((gx, ref_gx), (gy, ref_gy)):
                scale = r.abs().max().item()
                torch.testing.assert_close(g.double().cpu(), r, rtol=2 * eps_in, atol=2 * eps_in * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_ext_and_torch_agree(device):
    if len(backends(device)) < 2:
        pytest.skip("extension not built for this device")
    for grouping in GROUPINGS:
        x, y = make_pair((4, 3, 16, 16), torch.float32, device, seed=3)
        out = {}
        for name in backends(device):
            with backend(name):
                loss, stats = liftplace.lift_place_loss(x, y, grouping=grouping, return_stats=True)
                out[name] = (loss, *torch.autograd.grad(loss, [x, y]), stats)
        for a, b in zip(out["ext"][:3], out["torch"][:3]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
        for key, value in out["torch"][3].items():
            torch.testing.assert_close(out["ext"][3][key], value, rtol=2e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_give_identical_results(device):
    x, y = make_pair((2, 4, 8, 12), torch.float32, device, seed=5, requires_grad=False)
    expected = liftplace.lift_place_loss(x, y)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)          # non-contiguous view
    xc = x.contiguous(memory_format=torch.channels_last)
    yc = y.contiguous(memory_format=torch.channels_last)
    # Same values after the row-major copy, so the results are bitwise equal.
    assert torch.equal(liftplace.lift_place_loss(xt, y), expected)
    assert torch.equal(liftplace.lift_place_loss(xc, yc), expected)
    xs = torch.randn(2, 4, 8, 24, device=device)[..., ::2].copy_(x)  # strided slice
    assert torch.equal(liftplace.lift_place_loss(xs, y), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_bitwise_reproducible(device, grouping):
    x, y = make_pair((4, 3, 16, 16), torch.float32, device, seed=9)
    for name in backends(device):
        with backend(name):
            first = run(x, y, grouping=grouping)
            second = run(x, y, grouping=grouping)
            for a, b in zip(first, second):
                assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_without_grad_gets_none(device):
    x, y = make_pair((2, 3, 8, 8), torch.float32, device, seed=1)
    y = y.detach()
    for name in backends(device):
        with backend(name):
            loss = liftplace.lift_place_loss(x, y)
            loss.backward()
            assert x.grad is not None and torch.isfinite(x.grad).all() and y.grad is None
            x.grad = None


@pytest.mark.parametrize("device", DEVICES)
def test_stats(device):
    x, y = make_pair((2, 3, 8, 8), torch.float32, device, seed=2)
    for name in backends(device):
        with backend(name):
            loss, stats = liftplace.lift_place_loss(x, y, group_size=8, return_stats=True)
            slope, intercept = liftplace.fit_groups(x, y, group_size=8)
            assert set(stats) >= {"coarse", "fine", "weight", "slope_mean", "intercept_mean",
                                  "slope_absdev", "intercept_absdev", "output_mse"}
            for v in stats.values():
                assert v.dim() == 0 and not v.requires_grad and v.device.type == device
            torch.testing.assert_close(stats["slope_mean"], slope.mean())
            torch.testing.assert_close(stats["intercept_mean"], intercept.mean())
            torch.testing.assert_close(stats["slope_absdev"], (slope - 1).abs().mean())
            torch.testing.assert_close(stats["intercept_absdev"], intercept.abs().mean())
            torch.testing.assert_close(stats["output_mse"], torch.nn.functional.mse_loss(x, y).detach())
            w = 1 - min(1.0, stats["slope_absdev"].item() + stats["intercept_absdev"].item())
            assert stats["weight"].item() == pytest.approx(w, rel=1e-6)
            torch.testing.assert_close(loss.detach(), stats["coarse"] + stats["weight"] * stats["fine"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_fit_groups_recovers_per_group_lines(device, grouping):
    x, y = make_pair((2, 3, 8, 8), torch.float64, device, seed=4, requires_grad=False)
    from testing import naive_groups

    for name in backends(device):
        with backend(name):
            slope, intercept = liftplace.fit_groups(x, y, group_size=16, grouping=grouping, eps=1e-12)
            G = 1 if grouping == "global" else 4
            assert slope.shape == intercept.shape == (2, 3, G)
            xr, yr = x.reshape(6, 64).cpu(), y.reshape(6, 64).cpu()
            for r in range(6):
                for g, idx in enumerate(naive_groups(xr[r], yr[r], 16, grouping, 8)):
                    A = torch.stack([xr[r, idx], torch.ones(len(idx), dtype=torch.float64)], 1)
                    sol = torch.linalg.lstsq(A, yr[r, idx, None]).solution.squeeze(1)
                    b, c = divmod(r, 3)
                    torch.testing.assert_close(slope[b, c, g].cpu(), sol[0], rtol=1e-9, atol=1e-9)
                    torch.testing.assert_close(intercept[b, c, g].cpu(), sol[1], rtol=1e-9, atol=1e-9)


def test_module_matches_function():
    x, y = make_pair((2, 3, 8, 8), torch.float32, "cpu", seed=6)
    module = liftplace.LiftPlaceLoss(group_size=8, norm="l2", reduction="mean")
    assert "norm='l2'" in repr(module)
    assert torch.equal(module(x, y), liftplace.lift_place_loss(x, y, group_size=8, norm="l2", reduction="mean"))
    sched = liftplace.LiftPlaceLoss(weight="cosine", total_steps=100)
    assert torch.equal(sched(x, y, step=50),
                       liftplace.lift_place_loss(x, y, weight="cosine", step=50, total_steps=100))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan_loss(device, bad):
    x, y = make_pair((2, 3, 8, 8), torch.float32, device, seed=8)
    y = y.detach().clone()
    y[1, 2, 3, 4] = bad
    for name in backends(device):
        with backend(name):
            for grouping in GROUPINGS:
                loss = liftplace.lift_place_loss(x, y, grouping=grouping)
                assert torch.isnan(loss), (name, grouping, loss)
                (gx,) = torch.autograd.grad(loss, [x])
                assert not torch.isfinite(gx).all()


def test_check_finite_names_the_input():
    x, y = make_pair((2, 3, 8, 8), torch.float32, "cpu", seed=8, requires_grad=False)
    y[0, 0, 0, :3] = float("nan")
    with pytest.raises(ValueError, match=r"teacher holds 3 non-finite"):
        liftplace.lift_place_loss(x, y, check_finite=True)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"student holds 1 non-finite"):
        liftplace.lift_place_loss(x, y, check_finite=True)


def test_reductions_differ_by_constant():
    x, y = make_pair((2, 3, 8, 8), torch.float64, "cpu", seed=12, requires_grad=False)
    s = liftplace.lift_place_loss(x, y, reduction="sum", weight="constant")
    m = liftplace.lift_place_loss(x, y, reduction="mean", weight="constant")
    torch.testing.assert_close(s, m * 3 * 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_coarse_anneal_at_the_ends_of_the_schedule(device, grouping, reduction):
    # w = 0: both settings are the coarse term alone; w = 1: annealing leaves the fine term
    # alone while the paper's loss keeps coarse + fine.
    x, y = make_pair((2, 3, 8, 8), torch.float32, device, seed=13)
    opts = dict(grouping=grouping, reduction=reduction, weight="linear", total_steps=10)
    for name in backends(device):
        with backend(name):
            def loss(**kw):
                return liftplace.lift_place_loss(x, y, **opts, **kw)

            assert torch.equal(loss(step=0, coarse_weight="anneal"), loss(step=0, coarse_weight="constant"))
            assert torch.equal(loss(step=0, coarse_weight="anneal"), loss(step=0, parts="coarse"))
            assert torch.equal(loss(step=10, coarse_weight="anneal"), loss(step=10, parts="fine"))
            both = loss(step=10, coarse_weight="constant")
            torch.testing.assert_close(both, loss(step=10, parts="coarse") + loss(step=10, parts="fine"))
            g_anneal = torch.autograd.grad(loss(step=10, coarse_weight="anneal"), [x, y])
            g_fine = torch.autograd.grad(loss(step=10, parts="fine"), [x, y])
            for a, b in zip(g_anneal, g_fine):
                assert torch.equal(a, b)
