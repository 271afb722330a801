"""Op-level parity of the fused CPU kernels with their pure-torch twins (liftplace._reference).

Tolerances follow the oracle pattern: the float64 evaluation of the same grouping is the
truth, and the kernel's error must stay within a small multiple of the twin's own error
at the same input dtype (plus a few output-dtype ulps). Group membership, determinism and
thread-count independence are checked bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import liftplace
from liftplace import _reference as ref

if not liftplace.backend_info()["cpu_ext"]:
    pytest.skip("liftplace was built without its CPU kernels", allow_module_level=True)

OPS = torch.ops.liftplace
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-7


def make_inputs(R, N, dtype, seed=0, offset=3.0):
    """Student/teacher rows with a non-trivial fit and |mean| > std (exercises centring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, N, generator=g, dtype=torch.float64) + offset
    y = 1.3 * x - 0.2 + 0.5 * torch.randn(R, N, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def fwd(x, y, P, grouping, norm="l1", width=0):
    return OPS.lift_place_fwd(x, y, P, grouping, norm, EPS, width)


def oracle_fwd(x, y, P, grouping, norm, width, gid):
    """float64 slope, intercept, rows, aux for a fixed grouping."""
    x64, y64 = x.double(), y.double()
    G = ref.num_groups(x.shape[1], P, grouping)
    a, b, rows = ref.lift_place_rows(x64, y64, P, grouping, norm, EPS, width, gid)
    _, _, mx, my, d, _ = ref.fit(x64, y64, gid, G, EPS)
    return a, b, rows, torch.stack([mx, my, d], dim=2)


def max_err(t, truth):
    return (t.double() - truth.double()).abs().max().item()


def assert_close_to_oracle(name, got, twin, truth, k=2.0, ulps=8.0):
    assert got.dtype == twin.dtype and got.shape == twin.shape, (name, got.dtype, twin.dtype, got.shape, twin.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = truth.double().abs().max().item()
    atol = ulps * torch.finfo(got.dtype).eps * max(scale, 1e-30)
    e_got, e_twin = max_err(got, truth), max_err(twin, truth)
    assert e_got <= k * e_twin + atol, f"{name}: kernel error {e_got:.3g} vs twin error {e_twin:.3g} (atol {atol:.3g})"


def check_fwd(x, y, P, grouping, norm="l1", width=0):
    out = fwd(x, y, P, grouping, norm, width)
    twin = ref.lift_place_fwd(x, y, P, grouping, norm, EPS, width)
    # Membership is integer work: it must match the twin's stable sort exactly.
    assert out[4].dtype == torch.int32 and torch.equal(out[4], twin[4])
    gid = ref.group_ids(x, y, P, grouping, width)
    truth = oracle_fwd(x, y, P, grouping, norm, width, gid)
    # In float64 the twin is its own oracle; allow the rounding of a sum over the longest group.
    longest = x.shape[1] if grouping == "global" else P + x.shape[1] % P
    ulps = 4.0 * longest if x.dtype == torch.float64 else 8.0
    for name, got, tw, tr in zip(("slope", "intercept", "rows", "aux"), out[:4], twin[:4], truth):
        assert_close_to_oracle(name, got, tw, tr, ulps=ulps)
    return out, twin, gid, truth


def check_bwd(x, y, P, grouping, norm, width, out, twin, gid, truth, with_extra=True, need_grad_y=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    acc = out[0].dtype
    R, G = out[0].shape
    grad_rows = torch.randn(R, ref.ROW_STATS, generator=g, dtype=torch.float64)
    grad_slope = torch.randn(R, G, generator=g, dtype=torch.float64) if with_extra else None
    grad_intercept = torch.randn(R, G, generator=g, dtype=torch.float64) if with_extra else None

    def cast(t, dtype):
        return None if t is None else t.to(dtype)

    args = (P, grouping, norm, width, need_grad_y)
    grads = (grad_rows.to(acc), cast(grad_slope, acc), cast(grad_intercept, acc))
    gx, gy = OPS.lift_place_bwd(*grads, x, y, out[0], out[1], out[3], out[4], *args)
    if x.dtype == torch.float64:
        # The float64 twin is its own oracle, and the fit amplifies the forward's last-bit
        # differences; so check the backward alone, on the kernel's own saved statistics.
        tx, ty = ref.lift_place_bwd(*grads, x, y, out[0], out[1], out[3], out[4], *args)
        ox, oy = tx, ty
    else:
        tx, ty = ref.lift_place_bwd(*grads, x, y, twin[0], twin[1], twin[3], twin[4], *args)
        saved_gid = gid.to(torch.int32) if grouping == "error" else out[4]
        ox, oy = ref.lift_place_bwd(grad_rows, grad_slope, grad_intercept, x.double(), y.double(),
                                    truth[0], truth[1], truth[3], saved_gid, *args)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_close_to_oracle("grad_x", gx, tx, ox)
    if need_grad_y:
        assert gy.dtype == y.dtype
        assert_close_to_oracle("grad_y", gy, ty, oy)
    else:
        assert gy.numel() == 0


# (R, N, P, grouping, width): N % P != 0, P = 2, P = N, R = 1, patch tiles of 2 and 4.
CASES = [
    (6, 1000, 16, "error", 0),
    (3, 1024, 16, "error", 0),
    (2, 77, 2, "error", 0),
    (4, 300, 300, "error", 0),
    (1, 513, 7, "error", 0),
    (5, 1024, 1024, "global", 0),
    (1, 999, 999, "global", 0),
    (3, 32 * 48, 16, "patch", 48),
    (2, 12 * 8, 4, "patch", 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}-R{c[0]}-N{c[1]}-P{c[2]}")
def test_parity(case, dtype):
    R, N, P, grouping, width = case
    x, y = make_inputs(R, N, dtype, seed=N + P)
    for norm in ("l1", "l2"):
        out, twin, gid, truth = check_fwd(x, y, P, grouping, norm, width)
        check_bwd(x, y, P, grouping, norm, width, out, twin, gid, truth,
                  with_extra=norm == "l1", need_grad_y=norm == "l2")


@pytest.mark.parametrize("need_grad_y", [True, False])
@pytest.mark.parametrize("with_extra", [True, False])
def test_bwd_optional_grads(with_extra, need_grad_y):
    x, y = make_inputs(4, 500, torch.float32, seed=3)
    out, twin, gid, truth = check_fwd(x, y, 16, "error", "l1")
    check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth, with_extra=with_extra, need_grad_y=need_grad_y)


def test_long_rows():
    # uint16 index at N = 65536, uint32 beyond it.
    for N in (65536, 70001):
        x, y = make_inputs(2, N, torch.float32, seed=N)
        out, twin, gid, truth = check_fwd(x, y, 16, "error")
        check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N", [1000, 4099, 70001])
def test_error_key_ranges(dtype, N):
    # The sort runs only over the bits where a row's keys differ: rows whose errors span a
    # narrow range (one pass), one huge outlier over a narrow bulk (the low passes see few
    # distinct digits), and errors that are multiples of a power of two (a middle digit
    # constant, so that pass is skipped). Membership must still equal the stable sort's.
    g = torch.Generator().manual_seed(N)
    x = torch.randn(4, N, generator=g, dtype=torch.float64)
    d = torch.empty(4, N, dtype=torch.float64)
    d[0] = 1e-3 * (1 + 1e-4 * torch.rand(N, generator=g, dtype=torch.float64))
    d[1] = 0.5 + 1e-3 * torch.rand(N, generator=g, dtype=torch.float64)
    d[1, N // 2] = 1e3
    d[2] = torch.randint(0, 64, (N,), generator=g).double() * 2.0 ** -4
    d[3] = torch.randn(N, generator=g, dtype=torch.float64) * torch.exp(3 * torch.randn(N, generator=g, dtype=torch.float64))
    x, y = x.to(dtype), (x + d).to(dtype)
    out, twin, gid, truth = check_fwd(x, y, 16, "error")
    check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_ties_follow_index(dtype):
    # Few distinct values: many equal errors, which a stable sort orders by index.
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(-3, 4, (5, 999), generator=g) / 2).to(dtype)
    y = (torch.randint(-3, 4, (5, 999), generator=g) / 2).to(dtype)
    y[0] = x[0]  # a row of all-zero errors: every sort pass is trivial
    out = fwd(x, y, 8, "error")
    assert torch.equal(out[4], ref.lift_place_fwd(x, y, 8, "error", "l1", EPS)[4])


def test_nan_rows():
    x, y = make_inputs(4, 300, torch.float32, seed=7)
    x[1, 10] = float("nan")
    y[2, 3] = float("nan")
    y[2, 200] = -float("nan")  # a NaN with the sign bit set
    x[3, 5] = float("inf")
    y[3, 5] = float("inf")  # inf - inf = NaN error
    out = fwd(x, y, 16, "error")
    twin = ref.lift_place_fwd(x, y, 16, "error", "l1", EPS)
    assert torch.equal(out[4], twin[4]), "NaN errors must rank last, ties by index"
    rows = out[2]
    assert torch.isfinite(rows[0]).all()
    for r in (1, 2, 3):
        assert rows[r].isnan().any(), f"row {r} with a NaN input must give NaN statistics"
    torch.testing.assert_close(rows, twin[2], equal_nan=True, rtol=1e-5, atol=1e-5)
    gx, gy = OPS.lift_place_bwd(torch.ones_like(rows), None, None, x, y, out[0], out[1], out[3], out[4],
                                16, "error", "l1", 0, True)
    assert torch.isfinite(gx[0]).all() and torch.isfinite(gy[0]).all()


@pytest.mark.parametrize("grouping", ["error", "global", "patch"])
def test_deterministic_and_thread_independent(grouping):
    R, N, P, width = 64, 1024, 16 if grouping != "global" else 1024, 32 if grouping == "patch" else 0
    x, y = make_inputs(R, N, torch.float32, seed=11)
    grad_rows = torch.randn(R, ref.ROW_STATS, generator=torch.Generator().manual_seed(2))

    def run():
        out = fwd(x, y, P, grouping, "l1", width)
        grads = OPS.lift_place_bwd(grad_rows, None, None, x, y, out[0], out[1], out[3], out[4],
                                   P, grouping, "l1", width, True)
        return out + grads

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    # No float atomics and a fixed summation order: bitwise equal, whatever the thread count.
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_empty_batch():
    x = torch.empty(0, 64)
    out = fwd(x, x, 16, "error")
    assert [tuple(t.shape) for t in out] == [(0, 4), (0, 4), (0, 7), (0, 4, 3), (0, 64)]
    gx, gy = OPS.lift_place_bwd(out[2], None, None, x, x, out[0], out[1], out[3], out[4], 16, "error", "l1", 0, True)
    assert gx.shape == (0, 64) and gy.shape == (0, 64)


@pytest.mark.parametrize("bad, match", [
    (lambda x, y: (x, y[:, :-1], 16, "error", 0), "differ in shape"),
    (lambda x, y: (x, y.double(), 16, "error", 0), "differ in dtype"),
    (lambda x, y: (x, y, 1, "error", 0), "group_size"),
    (lambda x, y: (x, y, 65, "error", 0), "group_size"),
    (lambda x, y: (x, y, 8, "patch", 8), "square"),
    (lambda x, y: (x, y, 16, "patch", 6), "divisible"),
    (lambda x, y: (x, y, 16, "rank", 0), "grouping must be"),
    (lambda x, y: (x.t(), y.t(), 4, "error", 0), "contiguous"),
])
def test_input_errors(bad, match):
    x, y = make_inputs(8, 64, torch.float32)
    xb, yb, P, grouping, width = bad(x, y)
    with pytest.raises(RuntimeError, match=match):
        OPS.lift_place_fwd(xb, yb, P, grouping, "l1", EPS, width)


def test_bwd_rejects_foreign_group_id():
    x, y = make_inputs(2, 64, torch.float32)
    out = fwd(x, y, 16, "error")
    bad = out[4].clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="group_id"):
        OPS.lift_place_bwd(out[2], None, None, x, y, out[0], out[1], out[3], bad, 16, "error", "l1", 0, False)


@pytest.mark.parametrize("grouping, P, width", [("error", 8, 0), ("global", 48, 0), ("patch", 4, 8)])
def test_opcheck(grouping, P, width):
    x, y = make_inputs(3, 48, torch.float32, seed=13)
    x.requires_grad_(True)
    torch.library.opcheck(OPS.lift_place_fwd.default, (x, y, P, grouping, "l1", EPS, width))
    out = fwd(x.detach(), y, P, grouping, "l1", width)
    grad_rows = torch.randn(3, ref.ROW_STATS)
    torch.library.opcheck(
        OPS.lift_place_bwd.default,
        (grad_rows, torch.randn_like(out[0]), None, x.detach(), y, out[0], out[1], out[3], out[4],
         P, grouping, "l1", width, True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grouping, N, P, width", [("error", 1000, 16, 0), ("global", 1001, 1001, 0),
                                                   ("patch", 32 * 32, 16, 32)])
def test_isa_builds_agree(monkeypatch, grouping, N, P, width, dtype):
    # The kernels are built for the baseline ISA and for AVX2 (picked at run time); AVX2
    # without FMA rounds lane for lane like the scalar code, so results are bitwise equal.
    x, y = make_inputs(6, N, dtype, seed=17)
    grad_rows = torch.randn(6, ref.ROW_STATS, generator=torch.Generator().manual_seed(3)).to(ref.acc_dtype(dtype))

    def run():
        out = fwd(x, y, P, grouping, "l2", width)
        return out + OPS.lift_place_bwd(grad_rows, None, None, x, y, out[0], out[1], out[3], out[4],
                                        P, grouping, "l2", width, True)

    native = run()
    monkeypatch.setenv("LIFTPLACE_CPU_ISA", "base")
    base = run()
    for a, b in zip(native, base):
        assert torch.equal(a, b)
