"""The flow-matching objective against a direct float64 computation, and flow runs end to end."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from liftplace import lift_place_loss  # noqa: E402
from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.flow import FlowMatchObjective, make_flow_scheduler  # noqa: E402
from testing import TINY_UNET  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
T = 1000


def _direct_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The FlowMatchEulerDiscreteScheduler training sigma at index floor(u·T), in float64 by hand:
    s = (T - i) / T, shifted s' = shift·s / (1 + (shift - 1)·s)."""
    i = torch.floor(u.double() * T).clamp(0, T - 1)
    s = (T - i) / T
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noising_target_and_weighting_match_float64(scheme, shift):
    obj = FlowMatchObjective(make_flow_scheduler(T, shift), scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    clean = torch.rand(6, 1, 4, 4) * 2 - 1
    noisy, t, target = obj.prepare(clean, torch.Generator().manual_seed(5))

    # the same draws in float64, written out from the SD3 training script's definitions
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(clean.shape, generator=g, dtype=torch.float32).double()
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.3, 0.8, size=(6,), generator=g).double())
    elif scheme == "mode":
        r = torch.rand(6, generator=g).double()
        u = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = torch.rand(6, generator=g).double()
    sigma = _direct_sigma(u, shift)
    s = sigma.view(-1, 1, 1, 1)
    x0 = clean.double()
    assert torch.allclose(t.double(), sigma * T, rtol=1e-6, atol=1e-4)
    assert torch.allclose(noisy.double(), (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(target.double(), noise - x0, atol=1e-6)
    w = obj.loss_weights(t)
    if scheme == "sigma_sqrt":
        assert torch.allclose(w.double(), sigma ** -2, rtol=1e-5)
    elif scheme == "cosmap":
        assert torch.allclose(w.double(), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)), rtol=1e-5)
    else:
        assert w is None
    assert (sigma > 0).all() and (sigma <= 1).all()


def test_weighted_denoising_loss_is_the_sd3_loss():
    """The trainer's weighted sd loss = mean_b w_b · sum_i (pred - target)^2 (kd_reduction=sum)."""
    from liftplace.train.objective import reduce_squared_error

    obj = FlowMatchObjective(make_flow_scheduler(T, 1.0), "cosmap")
    clean = torch.randn(4, 2, 4, 4)
    _, t, target = obj.prepare(clean, torch.Generator().manual_seed(1))
    pred = torch.randn_like(target)
    w = obj.loss_weights(t)
    got = reduce_squared_error(pred, target, "sum", w)
    sig = t.double() / T
    w64 = 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2))
    want = (w64 * (pred.double() - target.double()).square().flatten(1).sum(1)).mean()
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_adaptive_timestep_sigma_and_integer_timesteps_agree():
    """Buckets over σ in [0, 1] (t_max=1) equal buckets over σ·1000 (t_max=1000) and over integers."""
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    ints = torch.tensor([0, 99, 100, 450, 870, 999])
    kw = dict(weight="adaptive-timestep", num_buckets=10, return_stats=True, group_size=4)
    a, sa = lift_place_loss(s, y, timesteps=ints.double() / 1000, t_max=1.0, **kw)
    b, sb = lift_place_loss(s, y, timesteps=ints, t_max=1000, **kw)
    c, sc = lift_place_loss(s, y, timesteps=ints.float(), t_max=1000.0, **kw)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(sa["bucket_count"], sb["bucket_count"]) and torch.equal(sb["bucket_count"], sc["bucket_count"])
    # σ = 1 exactly (the noisiest flow sample) falls in the last bucket, not out of range
    d, sd = lift_place_loss(s, y, timesteps=torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.99]), t_max=1.0, **kw)
    assert int(sd["bucket_count"][9]) == 2 and torch.isfinite(d)


def _cfg(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TINY_UNET, dataset_name="synthetic", train_batch_size=4,
                max_train_steps=2, logging_steps=1, checkpointing_steps=100, validation_steps=0,
                num_validation_images=2, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
                progress_bar=False, objective="flow", weighting_scheme="cosmap", kd_weight="adaptive-timestep")
    base.update(kw)
    return build_config(None, base)


def test_flow_run_exports_flow_scheduler(tmp_path):
    """A forced flow run on the unet2d family exports a FlowMatchEulerDiscreteScheduler (the bug of the issue)."""
    r = Trainer(_cfg(tmp_path)).train()
    sched = json.loads((r.model_dir / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in rec)
    assert (tmp_path / "samples" / "step-000002.png").is_file()


def test_flow_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="prediction_type"):
        _cfg(tmp_path, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="snr_gamma"):
        _cfg(tmp_path, snr_gamma=5.0)
    with pytest.raises(ConfigError, match="weighting_scheme"):
        _cfg(tmp_path, weighting_scheme="logitnormal")
    with pytest.raises(ConfigError, match="logit_std"):
        _cfg(tmp_path, logit_std=0.0)
