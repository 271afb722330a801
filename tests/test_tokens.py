"""Token-shaped outputs: ``channel_dim`` equals the transposed channels-first call, on both backends."""

import pytest
import torch

from liftplace import LiftPlaceLoss, lift_place_loss
from liftplace.loss import fit_groups
from testing import DEVICES, backend, backends

CASES = [  # (B, N, D, group_size, grouping, weight)
    (2, 16, 6, 4, "error", "adaptive"),
    (3, 13, 5, 5, "error", "constant"),  # N % P != 0
    (2, 10, 3, 16, "global", "adaptive"),
]


def _pair(B, N, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    t = 0.7 * s + 0.3 * torch.randn(B, N, D, generator=g, dtype=torch.float64) + 0.1
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channel_dim", [-1, 2])
def test_tokens_equal_transposed_call(device, case, dtype, channel_dim):
    B, N, D, P, grouping, weight = case
    for name in backends(device):
        with backend(name):
            s0, t0 = _pair(B, N, D, dtype, device)
            s1 = s0.clone().requires_grad_(True)
            t1 = t0.clone().requires_grad_(True)
            s2 = s0.clone().requires_grad_(True)
            t2 = t0.clone().requires_grad_(True)
            kw = dict(group_size=P, grouping=grouping, weight=weight, return_stats=True)
            tok, st_tok = lift_place_loss(s1, t1, channel_dim=channel_dim, **kw)
            ref, st_ref = lift_place_loss(s2.transpose(1, 2), t2.transpose(1, 2), **kw)
            # same rows in the same order: bitwise the same statistics and loss
            assert torch.equal(tok, ref), name
            for k in st_ref:
                assert torch.equal(st_tok[k], st_ref[k]), (name, k)
            (tok * 1.5).backward()
            (ref * 1.5).backward()
            assert torch.equal(s1.grad, s2.grad) and torch.equal(t1.grad, t2.grad), name
            assert s1.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_module_and_buckets(device):
    """The module form with adaptive-timestep buckets, σ in [0, 1] (t_max=1)."""
    s, t = _pair(4, 12, 3, torch.float64, device, seed=1)
    sigmas = torch.tensor([0.05, 0.4, 0.41, 0.99], dtype=torch.float64, device=device)
    for name in backends(device):
        with backend(name):
            a = LiftPlaceLoss(group_size=4, weight="adaptive-timestep", num_buckets=4, t_max=1.0, channel_dim=-1)
            b = LiftPlaceLoss(group_size=4, weight="adaptive-timestep", num_buckets=4, t_max=1.0)
            x1 = s.clone().requires_grad_(True)
            x2 = s.clone().requires_grad_(True)
            la = a(x1, t, timesteps=sigmas)
            lb = b(x2.transpose(1, 2), t.transpose(1, 2), timesteps=sigmas)
            assert torch.equal(la, lb)
            la.backward()
            lb.backward()
            assert torch.equal(x1.grad, x2.grad)
            assert torch.equal(a.bucket_absdev, b.bucket_absdev)
            assert "channel_dim=-1" in repr(a) and "channel_dim" not in repr(b)


def test_tokens_fit_groups_and_fp64_reference():
    """fit_groups on tokens fits each feature channel over the tokens: a float64 direct check."""
    s, t = _pair(2, 8, 3, torch.float64, "cpu", seed=2)
    a, b = fit_groups(s, t, grouping="global", channel_dim=-1)
    assert a.shape == (2, 3, 1)
    for i in range(2):
        for d in range(3):
            x, y = s[i, :, d], t[i, :, d]
            vx = ((x - x.mean()) ** 2).mean() + 1e-7
            slope = ((x - x.mean()) * (y - y.mean())).mean() / vx
            assert torch.allclose(a[i, d, 0], slope, rtol=1e-12, atol=1e-12)
            assert torch.allclose(b[i, d, 0], y.mean() - slope * x.mean(), rtol=1e-12, atol=1e-12)


def test_channels_last_images():
    """channel_dim applies to any layout: [B, H, W, C] images equal the [B, C, H, W] call, patch included."""
    s, t = _pair(2, 16, 3, torch.float32, "cpu", seed=3)
    s, t = s.reshape(2, 4, 4, 3), t.reshape(2, 4, 4, 3)
    for grouping in ("patch", "error"):
        a = lift_place_loss(s, t, group_size=4, grouping=grouping, channel_dim=3)
        b = lift_place_loss(s.permute(0, 3, 1, 2), t.permute(0, 3, 1, 2), group_size=4, grouping=grouping)
        assert torch.equal(a, b)


def test_token_errors():
    s, t = _pair(2, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="grouping='patch'.*tokens"):
        lift_place_loss(s, t, group_size=4, grouping="patch", channel_dim=-1)
    with pytest.raises(ValueError, match="grouping='patch'.*tokens"):
        LiftPlaceLoss(group_size=4, grouping="patch", channel_dim=-1)(s, t)
    with pytest.raises(ValueError, match="channel_dim=0"):
        lift_place_loss(s, t, channel_dim=0)
    with pytest.raises(ValueError, match="channel_dim=3"):
        lift_place_loss(s, t, channel_dim=3)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        lift_place_loss(s, t, channel_dim=1.0)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        LiftPlaceLoss(channel_dim=True)
