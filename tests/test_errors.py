"""Bad input gets a clear error from the Python layer, before any kernel runs."""

import pytest
import torch

import liftplace

x = torch.randn(2, 3, 8, 8)
y = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("student,teacher,kwargs,exc,match", [
    (x, y[:, :2], {}, ValueError, r"student must have the same shape as teacher \[2, 2, 8, 8\], got \[2, 3, 8, 8\]"),
    (x[0, 0, 0], y[0, 0, 0], {}, ValueError, r"\[B, C, \*S\]"),
    (x[:, :, 0, 0], y[:, :, 0, 0], {}, ValueError, r"at least 3 dims"),
    (x[:, :, :1, :1], y[:, :, :1, :1], {"grouping": "global"}, ValueError, r"prod\(S\) >= 2"),
    (x, y, {"group_size": 1}, ValueError, r"group_size must be between 2 and the row length N=64"),
    (x, y, {"group_size": 65}, ValueError, r"group_size must be between 2 and the row length N=64"),
    (x, y, {"group_size": 4.0}, TypeError, r"group_size must be an int"),
    (x[..., 0], y[..., 0], {"grouping": "patch", "group_size": 4}, ValueError, r"2-D spatial dims"),
    (x, y, {"grouping": "patch", "group_size": 8}, ValueError, r"perfect square"),
    (x[..., :6], y[..., :6], {"grouping": "patch", "group_size": 16}, ValueError, r"divisible by 4"),
    (x, y, {"grouping": "rank"}, ValueError, r"grouping must be one of 'global', 'error', 'patch'; got 'rank'"),
    (x, y, {"norm": "L1"}, ValueError, r"norm must be one of"),
    (x, y, {"reduction": "none"}, ValueError, r"reduction must be one of"),
    (x, y, {"weight": "adaptiv"}, ValueError, r"weight must be one of"),
    (x, y, {"parts": "all"}, ValueError, r"parts must be one of"),
    (x, y, {"coarse_weight": "linear"}, ValueError, r"coarse_weight must be one of"),
    (x, y, {"eps": 0.0}, ValueError, r"eps must be a positive"),
    (x, y, {"weight": "linear"}, ValueError, r"needs step= and total_steps="),
    (x, y, {"weight": "cosine", "step": 1, "total_steps": 0}, ValueError, r"total_steps > 0"),
    (x.int(), y.int(), {}, TypeError, r"student must be float16, bfloat16, float32 or float64, got torch.int32"),
    (x.to(torch.complex64), y.to(torch.complex64), {}, TypeError, r"got torch.complex64"),
    (x, y.double(), {}, TypeError, r"teacher dtype torch.float64 does not match student dtype torch.float32"),
    (x, y.to("meta"), {}, ValueError, r"student is on cpu but teacher is on meta"),
    (x[:0], y[:0], {}, ValueError, r"empty"),
    (x.numpy(), y, {}, TypeError, r"student must be a torch.Tensor, got ndarray"),
])
def test_bad_input(student, teacher, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        liftplace.lift_place_loss(student, teacher, **kwargs)


def test_fit_groups_bad_input():
    with pytest.raises(ValueError, match="group_size must be between 2"):
        liftplace.fit_groups(x, y, group_size=100)
    with pytest.raises(ValueError, match="grouping must be one of"):
        liftplace.fit_groups(x, y, grouping="tiles")


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="norm must be one of"):
        liftplace.LiftPlaceLoss(norm="l3")


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        liftplace.set_backend("cuda")


def test_backend_env_var(tmp_path):
    import os
    import subprocess
    import sys

    code = "import liftplace; print(liftplace.get_backend())"
    env = dict(os.environ, LIFTPLACE_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    env["LIFTPLACE_BACKEND"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "LIFTPLACE_BACKEND must be one of" in out.stderr
    env["LIFTPLACE_BACKEND"] = "ext"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    if liftplace.backend_info()["ext_error"] is None:
        assert out.stdout.strip() == "ext", out.stderr
    else:
        assert out.returncode != 0 and "pip install --no-build-isolation" in out.stderr
