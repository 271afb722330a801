"""Cases found by probing the loss as a careful user would: each once gave a silent wrong
result or a bare traceback (double backward, fake kernels on mixed devices, twin accuracy,
overflow, unchecked options)."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import liftplace
from liftplace import _ops
from testing import DEVICES, EXT_CPU, backend, backends

REPO = Path(__file__).resolve().parents[1]


def pair(shape=(2, 3, 8, 8), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = 0.8 * x + 0.1 * torch.randn(shape, generator=g, dtype=dtype)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------
# Second-order gradients (issue: zero on the extension backend).

def grad_of_grad_norm(x, y, **opts):
    s = x.clone().requires_grad_()
    g, = torch.autograd.grad(liftplace.lift_place_loss(s, y, **opts), s, create_graph=True)
    return torch.autograd.grad((g * g).sum(), s)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", ["global", "error", "patch"])
@pytest.mark.parametrize("weight", ["constant", "adaptive"])
def test_double_backward_matches_the_twin(device, grouping, weight):
    x, y = pair(dtype=torch.float64, device=device)
    opts = dict(grouping=grouping, group_size=16, weight=weight)
    with backend("torch"):
        want = grad_of_grad_norm(x, y, **opts)
    assert want.abs().sum() > 0  # the case must be able to catch a silent zero
    for name in backends(device):
        with backend(name):
            got = grad_of_grad_norm(x, y, **opts)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", ["global", "error", "patch"])
@pytest.mark.parametrize("parts", ["both", "coarse", "fine"])
def test_gradgradcheck_float64(device, grouping, parts):
    # Errors far apart so finite differences never reorder the "error" ranking; the fit
    # away from |a - 1| = 0 and |b| = 0, where L1 has a kink. A fixed weight: the adaptive
    # one is detached by definition. The fine term holds the fit constant in its first
    # derivative (METHOD.md §5); the second derivative is that of the gradient actually used.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    gaps = 0.05 * (torch.randperm(x.numel(), generator=g).double() + 1).reshape(x.shape)
    y = 0.7 * x + 0.2 + gaps
    x, y = x.to(device).requires_grad_(), y.to(device).requires_grad_()
    opts = dict(grouping=grouping, group_size=4, parts=parts, weight="constant")
    for name in backends(device):
        with backend(name):
            assert torch.autograd.gradgradcheck(lambda a, b: liftplace.lift_place_loss(a, b, **opts), (x, y))


# ---------------------------------------------------------------------------------------
# Fake kernels check what the real ones check.

@pytest.mark.skipif(not EXT_CPU, reason="needs the compiled extension")
def test_fake_kernels_refuse_mixed_devices():
    a = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.liftplace.lift_place_fwd(a, a.to("meta"), 16, "error", "l1", 1e-7, 0)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.liftplace.bucket_stats(a, torch.zeros(4).to("meta"), 4, 1000.0)
    m = a.to("meta")
    with pytest.raises(RuntimeError, match=r"group_size must be in \[2, 32\], got 0"):
        torch.ops.liftplace.lift_place_fwd(m, m, 0, "error", "l1", 1e-7, 0)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.liftplace.lift_place_fwd(m, m, 16, "error", "l1", 0.0, 0)


@pytest.mark.skipif(not EXT_CPU, reason="needs the compiled extension")
def test_fake_backward_checks_its_inputs():
    x, y = (t.reshape(6, 64) for t in pair())
    out = torch.ops.liftplace.lift_place_fwd(x, y, 16, "error", "l1", 1e-7, 0)
    meta = [t.to("meta") for t in (x, y, *out)]
    mx, my, slope, intercept, _, aux, gid = meta
    grad_rows = torch.ones(6, _ops.ROW_STATS, device="meta")
    good = torch.ops.liftplace.lift_place_bwd(grad_rows, None, None, mx, my, slope, intercept, aux, gid,
                                              16, "error", "l1", 0, True)
    assert good[0].shape == x.shape and good[1].shape == y.shape
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        torch.ops.liftplace.lift_place_bwd(grad_rows[:, :3], None, None, mx, my, slope, intercept, aux, gid,
                                           16, "error", "l1", 0, True)
    with pytest.raises(RuntimeError, match="group_id must be"):
        torch.ops.liftplace.lift_place_bwd(grad_rows, None, None, mx, my, slope, intercept, aux, gid[:, :5],
                                           16, "error", "l1", 0, True)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.liftplace.lift_place_bwd(grad_rows, None, None, mx, my, slope, intercept, torch.zeros(aux.shape), gid,
                                           16, "error", "l1", 0, True)


# ---------------------------------------------------------------------------------------
# The twin is as accurate as the kernels and overflows where they do.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", ["global", "error"])
def test_large_mean_small_spread_keeps_float32_accuracy(device, grouping):
    X = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x, y = (1e4 + 1e-2 * X).to(device), (1e4 + 2e-2 * X).to(device)
    # The float64 fit of the same float32 inputs (their own rounding is part of the data).
    slope64, intercept64 = liftplace.fit_groups(x.double(), y.double(), grouping=grouping)
    for name in backends(device):
        with backend(name):
            slope, intercept = liftplace.fit_groups(x, y, grouping=grouping)
        # float32 output rounding of a slope ~2 and an intercept ~1e4, a few ulps.
        assert (slope.double() - slope64).abs().max() < 8 * 2 * 2**-23, name
        assert (intercept.double() - intercept64).abs().max() < 8 * 1e4 * 2**-23, name


@pytest.mark.parametrize("device", DEVICES)
def test_overflowing_inputs_give_the_same_result_on_every_backend(device):
    x, y = pair(seed=4, device=device)
    x, y = x * 1e20, y * 1e20  # finite, but their squares are not in float32
    results = {}
    for name in backends(device):
        with backend(name):
            loss, stats = liftplace.lift_place_loss(x, y, return_stats=True)
        results[name] = (loss, stats)
        assert not math.isfinite(stats["output_mse"].item())  # the squared error overflows
    ref_loss, ref_stats = results["torch"]
    for loss, stats in results.values():
        assert torch.equal(loss.isfinite(), ref_loss.isfinite())
        for key, value in ref_stats.items():
            assert torch.equal(stats[key].isfinite(), value.isfinite()), key
    with pytest.raises(OverflowError, match="overflows torch.float32"):
        liftplace.lift_place_loss(x, y, check_finite=True)
    # float64 holds the same values without overflow.
    assert liftplace.lift_place_loss(x.double(), y.double(), check_finite=True).isfinite()


# ---------------------------------------------------------------------------------------
# Options: clear errors instead of silence or bare TypeErrors.

x0, y0 = pair()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight="linear", step=float("nan"), total_steps=10), ValueError, r"step must be finite"),
    (dict(weight="linear", step=1, total_steps=float("inf")), ValueError, r"total_steps must be finite"),
    (dict(weight="cosine", step="5", total_steps=10), TypeError, r"step must be an int or float, got str"),
    (dict(weight="linear", step=True, total_steps=10), TypeError, r"step must be an int or float"),
    (dict(grouping="global", group_size="abc"), TypeError, r"group_size must be an int"),
    (dict(grouping="global", group_size=2.5), TypeError, r"group_size must be an int"),
    (dict(grouping="global", group_size=1000), ValueError, r"group_size must be between 2 and the row length N=64"),
    (dict(timesteps=torch.tensor([1.0, float("nan")]), num_buckets=4, t_max=1000), ValueError, r"timesteps hold NaN"),
    (dict(timesteps=torch.tensor([1, 2]), num_buckets=10**9, t_max=1000), ValueError, r"num_buckets must be an int >= 1 and <= 65536"),
    (dict(timesteps=torch.tensor([1, 2])), ValueError, r"timesteps= needs num_buckets= and t_max="),
    (dict(timesteps=torch.tensor([1, 2]), num_buckets=4, t_max=1000, bucket_ema="0.9"), ValueError, r"bucket_ema must be in \[0, 1\) or None"),
    (dict(eps=float("inf")), ValueError, r"eps must be a positive finite float"),
    (dict(check_finite=1), TypeError, r"check_finite must be a bool"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        liftplace.lift_place_loss(x0, y0, **kwargs)


def test_global_grouping_accepts_the_default_and_valid_group_sizes():
    base = liftplace.lift_place_loss(x0, y0, grouping="global")
    for p in (2, 16, 64):
        assert torch.equal(liftplace.lift_place_loss(x0, y0, grouping="global", group_size=p), base)


def test_bucket_ema_none_uses_the_batch_alone():
    t = torch.tensor([10, 900])
    state = {"absdev": torch.zeros(4, dtype=torch.float64), "seen": torch.zeros(4, dtype=torch.bool)}
    kw = dict(weight="adaptive-timestep", timesteps=t, num_buckets=4, t_max=1000)
    loss = liftplace.lift_place_loss(x0, y0, bucket_state=state, bucket_ema=None, **kw)
    assert torch.equal(loss, liftplace.lift_place_loss(x0, y0, **kw, bucket_ema=0.5))
    assert not state["seen"].any()  # None: the state is left alone


def test_module_refuses_timesteps_without_buckets():
    module = liftplace.LiftPlaceLoss()
    with pytest.raises(ValueError, match="built without num_buckets="):
        module(x0, y0, timesteps=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="total_steps must be finite"):
        liftplace.LiftPlaceLoss(weight="linear", total_steps=float("nan"))
    with pytest.raises(ValueError, match="group_size must be between 2"):
        liftplace.LiftPlaceLoss(group_size=1)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_groups_eps_inf_is_refused_on_every_backend(device):
    x, y = pair(device=device)
    for name in backends(device):
        with backend(name), pytest.raises(ValueError, match="eps must be a positive finite float"):
            liftplace.fit_groups(x, y, eps=float("inf"))


def test_options_are_one_frozen_value():
    module = liftplace.LiftPlaceLoss(group_size=4, grouping="patch", weight="constant")
    assert isinstance(module.options, liftplace.LiftPlaceOptions)
    with pytest.raises(AttributeError):
        module.options.group_size = 9
    assert "grouping='patch'" in repr(module)
    with pytest.raises(ValueError, match="norm must be one of"):
        liftplace.LiftPlaceOptions(norm="l3")


# ---------------------------------------------------------------------------------------
# Importing the package: never silently slow.

def test_missing_extension_warns_once_with_the_fix(tmp_path):
    shutil.copytree(Path(liftplace.__file__).parent, tmp_path / "liftplace",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = "import liftplace, warnings; print(liftplace.backend_info()['ext_error'])"
    env = {k: v for k, v in os.environ.items() if k != "LIFTPLACE_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no compiled liftplace._C" in out.stdout
    assert out.stderr.count("RuntimeWarning") == 1 and "make build" in out.stderr
    env["LIFTPLACE_BACKEND"] = "torch"  # an explicit choice needs no warning
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr


@pytest.mark.skipif(not list((REPO / "liftplace").glob("_C*.so")), reason="no in-place build (run `make build`)")
def test_repository_root_imports_the_kernels_after_make_build():
    code = "import liftplace; i = liftplace.backend_info(); print(liftplace.__file__, i['cpu_ext'], i['ext_error'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, cpu_ext = out.stdout.split()[:2]
    assert Path(path).parent == REPO / "liftplace" and cpu_ext == "True", out.stdout + out.stderr


def test_torch_version_mismatch_warns_with_both_versions_and_the_fix(tmp_path):
    installed = Path(liftplace.__file__).parent
    if not (installed / "_build_info.py").exists():
        pytest.skip("no build info: the extension was never built")
    shutil.copytree(installed, tmp_path / "liftplace", ignore=shutil.ignore_patterns("__pycache__"))
    info = tmp_path / "liftplace" / "_build_info.py"
    info.write_text(info.read_text().replace(f'TORCH_VERSION = "{liftplace.backend_info()["built_with_torch"]}"',
                                             'TORCH_VERSION = "2.1.0"'))
    code = "import liftplace; i = liftplace.backend_info(); print(i['torch_mismatch'], i['cpu_ext'])"
    env = {k: v for k, v in os.environ.items() if k != "LIFTPLACE_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
    assert out.stderr.count("RuntimeWarning") == 1
    assert f"built against torch 2.1.0 but torch {torch.__version__} is installed" in out.stderr
    assert "--no-build-isolation --force-reinstall" in out.stderr and "+pt" in out.stderr
