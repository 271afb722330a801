"""The eager fast path of the loss (loss.py's _fused: the op lift_place_kd with its C++
autograd node and lift_place_kd_bwd, csrc/kd.cpp) against the general path (lift_place_fwd,
then _LinearInRows): the same kernels and reduction ops, so values, statistics and gradients must be
equal bit for bit, on fresh random inputs over dtypes, groupings and options."""

from __future__ import annotations

import pytest
import torch

import liftplace.loss as L
from liftplace import _ops, lift_place_loss
from testing import DEVICES, ext_available

pytestmark = pytest.mark.skipif(not _ops.HAS_KD, reason="liftplace was built without its extension")

OPTIONS = [
    {},
    {"parts": "coarse"},
    {"parts": "fine"},
    {"coarse_weight": "anneal"},
    {"coarse_weight": "anneal", "norm": "l2", "reduction": "mean"},
    {"weight": "constant"},
    {"weight": "cosine", "step": 3, "total_steps": 10},
    {"weight": "linear", "step": 7, "total_steps": 10, "parts": "fine"},
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here")
    if not ext_available(request.param):
        pytest.skip(f"liftplace was built without its {request.param} kernels")
    return request.param


def general(monkeypatch, *args, **kw):
    """The call with the fast path switched off."""
    with monkeypatch.context() as m:
        m.setattr(L, "_fused_ok", lambda *a: False)
        return lift_place_loss(*args, **kw)


def run(fn, s, t, **kw):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(t.is_floating_point() and kw.pop("teacher_grad", False))
    loss, stats = fn(s, t, return_stats=True, **kw)
    inputs = (s, t) if t.requires_grad else (s,)
    return loss, stats, torch.autograd.grad(loss, inputs)


def assert_same(a, b):
    (la, sa, ga), (lb, sb, gb) = a, b
    assert la.dtype == lb.dtype and torch.equal(la, lb), (la, lb)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(ga) == len(gb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grouping", ["error", "global", "patch"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fast_path_equals_general_path_bitwise(device, monkeypatch, dtype, grouping, opts):
    g = torch.Generator().manual_seed(hash((str(dtype), grouping, str(opts))) % 2**31)
    s = (torch.randn(3, 2, 8, 8, generator=g) + 1).to(device, dtype)
    t = (1.3 * s.float() - 0.2 + 0.5 * torch.randn(3, 2, 8, 8, generator=g).to(device)).to(dtype)
    fast = run(lift_place_loss, s, t, grouping=grouping, teacher_grad=True, **opts)
    slow = run(lambda *a, **k: general(monkeypatch, *a, **k), s, t, grouping=grouping, teacher_grad=True, **opts)
    assert_same(fast, slow)


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_tokens_and_frozen_teacher(device, monkeypatch, teacher_grad):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 40, 6, generator=g).to(device)
    t = torch.randn(2, 40, 6, generator=g).to(device)
    kw = dict(channel_dim=-1, group_size=8, teacher_grad=teacher_grad)
    fast = run(lift_place_loss, s, t, **dict(kw))
    slow = run(lambda *a, **k: general(monkeypatch, *a, **k), s, t, **kw)
    assert_same(fast, slow)


def test_fast_path_is_taken_only_where_it_applies(monkeypatch):
    calls = []
    real = L._fused
    monkeypatch.setattr(L, "_fused", lambda *a: calls.append(1) or real(*a))
    s, t = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 8, 8)
    lift_place_loss(s, t).backward()
    assert len(calls) == 1
    lift_place_loss(s, t, check_finite=True)  # needs the rows between the ops
    lift_place_loss(s, t, timesteps=torch.tensor([3, 700]), num_buckets=4, t_max=1000)
    monkeypatch.setattr(L, "_distributed", lambda: True)  # the adaptive weight is summed over ranks
    lift_place_loss(s, t)
    assert len(calls) == 1
    monkeypatch.setattr(L, "_distributed", lambda: False)
    old = _ops.get_backend()
    _ops.set_backend("torch")  # the twins: the general path
    try:
        lift_place_loss(s, t)
    finally:
        _ops.set_backend(old)
    assert len(calls) == 1


def test_double_backward_equals_general_path(monkeypatch):
    g = torch.Generator().manual_seed(2)
    s0 = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)

    def hess_vec(fn):
        s = s0.clone().requires_grad_(True)
        (gs,) = torch.autograd.grad(fn(s, t, weight="constant"), s, create_graph=True)
        return gs, torch.autograd.grad(gs.square().sum(), s)[0]

    fast = hess_vec(lift_place_loss)
    slow = hess_vec(lambda *a, **k: general(monkeypatch, *a, **k))
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert fast[1].abs().sum() > 0


@pytest.mark.parametrize("grouping", ["error", "global"])
def test_gradcheck_through_the_fast_path(grouping):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: lift_place_loss(a, b, grouping=grouping, group_size=4, weight="constant")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))
    assert torch.autograd.gradgradcheck(fn, (s, t))


@pytest.mark.parametrize("grouping, P, width", [("error", 8, 0), ("global", 48, 0), ("patch", 4, 8)])
@pytest.mark.parametrize("adaptive, parts, anneal", [(True, "both", False), (True, "both", True),
                                                     (False, "coarse", False), (False, "fine", True)])
def test_opcheck(device, grouping, P, width, adaptive, parts, anneal):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 48, generator=g).to(device)
    y = (1.3 * x.cpu() + 0.5 * torch.randn(3, 48, generator=g)).to(device)
    args = (x, y, P, grouping, "l1", 1e-7, width, 0.5, float(3 * _ops.num_groups(48, P, grouping)), adaptive, 0.25,
            parts, anneal)
    torch.library.opcheck(torch.ops.liftplace.lift_place_kd.default, args)
    out = torch.ops.liftplace.lift_place_kd(*args)
    coef, slope, intercept, aux, gid = out[4:]
    torch.library.opcheck(torch.ops.liftplace.lift_place_kd_bwd.default,
                          (torch.tensor(1.5, device=device), coef, x, y, slope, intercept, aux, gid, P, grouping,
                           "l1", width, True))


def test_kd_op_rejects_bad_parts():
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="parts must be"):
        torch.ops.liftplace.lift_place_kd(x, x, 4, "error", "l1", 1e-7, 0, 1.0, 8.0, True, 0.0, "all", False)
