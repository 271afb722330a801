"""Timestep bucketing (METHOD.md §8): bucket_stats and weight="adaptive-timestep"."""

import pytest
import torch

import liftplace
from testing import DEVICES, backend, backends, make_pair

T, K = 1000, 4


@pytest.mark.parametrize("device", DEVICES)
def test_bucket_edges(device):
    t = torch.tensor([0, 249, 250, 499, 500, 999], device=device)
    v = torch.arange(6, dtype=torch.float32, device=device)
    for name in backends(device):
        with backend(name):
            sums, counts = liftplace.bucket_stats(v, t, K, T)
            assert counts.tolist() == [2, 2, 1, 1] and counts.dtype == torch.int64
            assert sums.tolist() == [0 + 1, 2 + 3, 4, 5]
            # Float timesteps: just below an edge stays below; beyond t_max clamps to K - 1.
            tf = torch.tensor([249.999, 250.0, 1500.0, 0.0], device=device, dtype=torch.float64)
            _, counts = liftplace.bucket_stats(v[:4], tf, K, T)
            assert counts.tolist() == [2, 1, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bucket_stats_match_a_loop(device, dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(37, 5, generator=g).to(dtype).to(device)
    t = torch.randint(0, T, (37,), generator=g).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.zeros(K, 5, dtype=torch.float64)
    for b in range(37):
        expected[int(t[b]) * K // T] += values[b].double().cpu()
    for name in backends(device):
        with backend(name):
            sums, counts = liftplace.bucket_stats(values, t, K, T)
            assert sums.dtype == acc
            torch.testing.assert_close(sums.double().cpu(), expected, rtol=1e-6, atol=1e-6)
            assert counts.sum().item() == 37
            again, _ = liftplace.bucket_stats(values, t, K, T)
            assert torch.equal(sums, again)


def per_sample_reference(x, y, t, **opts):
    """The adaptive-timestep loss from per-sample calls: each sample's coarse, fine and
    mean |a-1| + |b|, pooled per bucket by hand."""
    B = x.shape[0]
    rows = []
    for b in range(B):
        _, s = liftplace.lift_place_loss(x[b:b + 1], y[b:b + 1], weight="constant", return_stats=True, **opts)
        rows.append((s["coarse"], s["fine"], s["slope_absdev"] + s["intercept_absdev"]))
    k = [int(tb) * K // T for tb in t]
    w = {}
    for kb in set(k):
        members = [rows[b][2] for b in range(B) if k[b] == kb]
        w[kb] = 1 - min(1.0, (sum(members) / len(members)).item())
    loss = sum(rows[b][0] + w[k[b]] * rows[b][1] for b in range(B)) / B
    return loss, [w[kb] for kb in k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", ["error", "global"])
def test_adaptive_timestep_matches_per_bucket_loop(device, grouping):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64)
    # Samples that differ in how far the teacher is from the student, like timesteps do.
    spread = torch.linspace(0.02, 0.6, 6, dtype=torch.float64).view(6, 1, 1, 1)
    y = base + spread * torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64)
    x, y = base.to(device), y.to(device)
    t = torch.tensor([10, 900, 260, 270, 990, 20], device=device)
    opts = dict(grouping=grouping, group_size=16)
    expected, w = per_sample_reference(x, y, t, **opts)
    for name in backends(device):
        with backend(name):
            loss, stats = liftplace.lift_place_loss(x, y, weight="adaptive-timestep", timesteps=t,
                                                    num_buckets=K, t_max=T, return_stats=True, **opts)
            torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
            assert stats["bucket_count"].tolist() == [2, 2, 0, 2]
            assert torch.isnan(stats["bucket_coarse"][2]) and stats["bucket_weight"][2].item() == 0
            assert stats["bucket_weight"].shape == (K,)
            assert stats["weight"].item() == pytest.approx(sum(w) / len(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_one_bucket_equals_adaptive(device, dtype, rtol):
    x, y = make_pair((5, 3, 8, 8), dtype, device, seed=2)
    t = torch.randint(0, T, (5,), device=device)
    for name in backends(device):
        with backend(name):
            a = liftplace.lift_place_loss(x, y, weight="adaptive")
            b = liftplace.lift_place_loss(x, y, weight="adaptive-timestep", timesteps=t, num_buckets=1, t_max=T)
            torch.testing.assert_close(a, b, rtol=rtol, atol=0)
            ga = torch.autograd.grad(a, [x, y])
            gb = torch.autograd.grad(b, [x, y])
            for u, v in zip(ga, gb):
                torch.testing.assert_close(u, v, rtol=rtol * 10, atol=rtol * u.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_weight_each_sample_by_its_bucket(device):
    # The weights are constants of the step (detached), so the gradient must equal that of
    # sum_b coarse_b + w_b * fine_b with w_b frozen; gradcheck covers each part in float64.
    x, y = make_pair((4, 2, 8, 8), torch.float64, device, seed=3)
    t = torch.tensor([5, 600, 610, 990], device=device)
    opts = dict(group_size=16, num_buckets=K, t_max=T, timesteps=t)
    for name in backends(device):
        with backend(name):
            loss, stats = liftplace.lift_place_loss(x, y, weight="adaptive-timestep", return_stats=True, **opts)
            w_k = stats["bucket_weight"]
            gx = torch.autograd.grad(loss, [x])[0]
            coarse = liftplace.lift_place_loss(x, y, parts="coarse", group_size=16)
            expected = torch.autograd.grad(coarse, [x])[0].clone()
            for b, tb in enumerate(t.tolist()):
                fine_b = liftplace.lift_place_loss(x[b:b + 1], y[b:b + 1], parts="fine", group_size=16)
                expected += w_k[tb * K // T] * torch.autograd.grad(fine_b, [x])[0] / 4
            torch.testing.assert_close(gx, expected, rtol=1e-10, atol=1e-12)
            for part in ("coarse", "fine"):
                assert torch.autograd.gradcheck(
                    lambda a, b: liftplace.lift_place_loss(a, b, weight="adaptive-timestep", parts=part, **opts),
                    (x[:, :1, :4, :4].detach().requires_grad_(), y[:, :1, :4, :4].detach().requires_grad_()))


def test_module_ema_and_state_dict_round_trip():
    x, y = make_pair((4, 2, 8, 8), torch.float64, "cpu", seed=4, requires_grad=False)
    t = torch.tensor([5, 600, 610, 990])
    module = liftplace.LiftPlaceLoss(weight="adaptive-timestep", num_buckets=K, t_max=T, bucket_ema=0.9,
                                     return_stats=True)
    _, s1 = module(x, y, timesteps=t)
    first = module.bucket_absdev.clone()
    present = s1["bucket_count"] > 0
    assert module.bucket_seen.tolist() == present.tolist()
    y2 = y + 0.5 * torch.randn_like(y)
    _, s2 = module(x, y2, timesteps=t)
    current = s2["bucket_slope_absdev"] + s2["bucket_intercept_absdev"]
    torch.testing.assert_close(module.bucket_absdev[present], 0.9 * first[present] + 0.1 * current[present])
    state = module.state_dict()
    assert {"bucket_absdev", "bucket_seen"} <= set(state)
    clone = liftplace.LiftPlaceLoss(weight="adaptive-timestep", num_buckets=K, t_max=T, return_stats=True)
    clone.load_state_dict(state)
    assert torch.equal(clone.bucket_absdev, module.bucket_absdev)
    a, _ = module(x, y, timesteps=t)
    b, _ = clone(x, y, timesteps=t)
    assert torch.equal(a, b)
    # Evaluation mode reads the EMA but does not update it.
    module.eval()
    before = module.bucket_absdev.clone()
    module(x, y2, timesteps=t)
    assert torch.equal(module.bucket_absdev, before)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight="adaptive-timestep"), ValueError, r"needs timesteps="),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([1, 2, 3]), num_buckets=4, t_max=T), ValueError, r"timesteps must have shape \[2\]"),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([-1, 2]), num_buckets=4, t_max=T), ValueError, r"timesteps must be >= 0"),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([1, 1000]), num_buckets=4, t_max=T), ValueError, r"integer timesteps must be < t_max=1000"),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([1, 2]), num_buckets=0, t_max=T), ValueError, r"num_buckets must be an int >= 1"),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([1, 2]), num_buckets=4, t_max=None), ValueError, r"t_max must be a positive"),
    (dict(weight="adaptive-timestep", timesteps=[1, 2], num_buckets=4, t_max=T), TypeError, r"timesteps must be a torch.Tensor"),
    (dict(weight="adaptive-timestep", timesteps=torch.tensor([1, 2]), num_buckets=4, t_max=T, bucket_ema=1.0), ValueError, r"bucket_ema must be in"),
])
def test_bad_timestep_input(kwargs, exc, match):
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with pytest.raises(exc, match=match):
        liftplace.lift_place_loss(x, y, **kwargs)


def test_module_needs_buckets_for_timestep_weight():
    with pytest.raises(ValueError, match="needs num_buckets= and t_max="):
        liftplace.LiftPlaceLoss(weight="adaptive-timestep")
