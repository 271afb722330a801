"""Op-level tests of the compiled kernels (torch.ops.liftplace.*) against their pure-torch
twins (liftplace._reference), on every device in DEVICES and every dtype in DTYPES.

Tolerances are error ratios: the float64 evaluation of the same grouping is the truth, and
the kernel's error must stay within a small multiple of the twin's own error at the same
input dtype, plus a few ulps of the output dtype scaled by the magnitude. Group membership,
determinism, thread-count and ISA independence are checked bit for bit. On a machine with
a GPU and the CUDA kernels built, every case also runs on "cuda" (each CUDA kernel: the
block sort and the device-wide sorts, the fit, the backward, bucket_stats); here those
cases skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from liftplace import _reference as ref
from testing import DEVICES, DTYPES, ext_available

OPS = torch.ops.liftplace
EPS = 1e-7
CUDA_ONLY = pytest.mark.parametrize("device", ["cuda"])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _kernels_built(request):
    dev = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here")
    if not ext_available(dev):
        pytest.skip(f"liftplace was built without its {dev} kernels")


def make_inputs(R, N, dtype, device="cpu", seed=0, offset=3.0):
    """Student/teacher rows with a non-trivial fit and |mean| > std (exercises centring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, N, generator=g, dtype=torch.float64) + offset
    y = 1.3 * x - 0.2 + 0.5 * torch.randn(R, N, generator=g, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


def fwd(x, y, P, grouping, norm="l1", width=0):
    return OPS.lift_place_fwd(x, y, P, grouping, norm, EPS, width)


def bwd(grads, x, y, out, P, grouping, norm="l1", width=0, need_grad_y=True):
    return OPS.lift_place_bwd(*grads, x, y, out[0], out[1], out[3], out[4], P, grouping, norm, width, need_grad_y)


def oracle_fwd(x, y, P, grouping, norm, width, gid):
    """float64 slope, intercept, rows, aux for a fixed grouping."""
    x64, y64 = x.double(), y.double()
    G = ref.num_groups(x.shape[1], P, grouping)
    a, b, rows = ref.lift_place_rows(x64, y64, P, grouping, norm, EPS, width, gid)
    _, _, mx, my, d, _ = ref.fit(x64, y64, gid, G, EPS)
    return a, b, rows, torch.stack([mx, my, d], dim=2)


def max_err(t, truth):
    return (t.double() - truth.double()).abs().max().item() if t.numel() else 0.0


def assert_close_to_oracle(name, got, twin, truth, k=2.0, ulps=8.0):
    """Error ratio: |got - truth| <= k * |twin - truth| + ulps * eps(dtype) * max|truth|.

    NaNs must sit where the twin has them; the rest is compared as above.
    """
    assert got.dtype == twin.dtype and got.shape == twin.shape, (name, got.dtype, twin.dtype, got.shape, twin.shape)
    assert got.device == twin.device, (name, got.device, twin.device)
    nan = twin.isnan()
    assert torch.equal(got.isnan(), nan), f"{name}: NaNs where the twin has none, or the reverse"
    got, twin, truth = got[~nan], twin[~nan], truth[~nan]
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
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


def random_grads(R, G, device, with_extra=True, seed=1):
    """float64 (grad_rows, grad_slope, grad_intercept); the optional two None without extras."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(R, ref.ROW_STATS)] + [(R, G)] * 2 * with_extra
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes]
    return tuple(grads + [None] * (3 - len(grads)))


def check_bwd(x, y, P, grouping, norm, width, out, twin, gid, truth, with_extra=True, need_grad_y=True, seed=1):
    R, G = out[0].shape
    grads64 = random_grads(R, G, x.device, with_extra, seed)
    grads = tuple(None if t is None else t.to(out[0].dtype) for t in grads64)
    args = (P, grouping, norm, width, need_grad_y)
    gx, gy = bwd(grads, x, y, out, *args)
    if x.dtype == torch.float64:
        # The float64 twin is its own oracle, and the fit amplifies the forward's last-bit
        # differences; so check the backward alone, on the kernel's own saved statistics.
        tx, ty = ref.lift_place_bwd(*grads, x, y, out[0], out[1], out[3], out[4], *args)
        ox, oy = tx, ty
    else:
        tx, ty = ref.lift_place_bwd(*grads, x, y, twin[0], twin[1], twin[3], twin[4], *args)
        saved_gid = gid.to(torch.int32) if grouping == "error" else out[4]
        ox, oy = ref.lift_place_bwd(*grads64, x.double(), y.double(), truth[0], truth[1], truth[3], saved_gid, *args)
    assert gx.dtype == x.dtype and gx.shape == x.shape and gx.device == x.device
    assert_close_to_oracle("grad_x", gx, tx, ox)
    if need_grad_y:
        assert gy.dtype == y.dtype
        assert_close_to_oracle("grad_y", gy, ty, oy)
    else:
        assert gy.numel() == 0


# (R, N, P, grouping, width): N % P != 0, P = 2, P = N, R = 1, patch tiles of 2 and 4, and
# a row past 16384 elements (the CUDA device-wide sort).
CASES = [
    (6, 1000, 16, "error", 0),
    (3, 1024, 16, "error", 0),
    (2, 77, 2, "error", 0),
    (4, 300, 300, "error", 0),
    (1, 513, 7, "error", 0),
    (2, 160 * 160, 64, "error", 0),
    (5, 1024, 1024, "global", 0),
    (1, 999, 999, "global", 0),
    (3, 32 * 48, 16, "patch", 48),
    (2, 12 * 8, 4, "patch", 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}-R{c[0]}-N{c[1]}-P{c[2]}")
def test_parity(device, case, dtype):
    R, N, P, grouping, width = case
    x, y = make_inputs(R, N, dtype, device, seed=N + P)
    for norm in ("l1", "l2"):
        out, twin, gid, truth = check_fwd(x, y, P, grouping, norm, width)
        check_bwd(x, y, P, grouping, norm, width, out, twin, gid, truth,
                  with_extra=norm == "l1", need_grad_y=norm == "l2")


@pytest.mark.parametrize("need_grad_y", [True, False])
@pytest.mark.parametrize("with_extra", [True, False])
def test_bwd_optional_grads(device, with_extra, need_grad_y):
    x, y = make_inputs(4, 500, torch.float32, device, seed=3)
    out, twin, gid, truth = check_fwd(x, y, 16, "error", "l1")
    check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth, with_extra=with_extra, need_grad_y=need_grad_y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [2048, 2049, 8193, 16384, 16385, 65536, 70001])
def test_row_lengths(device, N, dtype):
    # Around every switch of algorithm: CUDA's three block-sort sizes (2048, 8192, 16384
    # elements) and the device-wide sort beyond; the CPU's uint16 index up to 65536.
    x, y = make_inputs(2, N, dtype, device, seed=N)
    out, twin, gid, truth = check_fwd(x, y, 16, "error")
    check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N", [1000, 4099, 70001])
def test_error_key_ranges(device, dtype, N):
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
    x, y = x.to(dtype=dtype, device=device), (x + d).to(dtype=dtype, device=device)
    out, twin, gid, truth = check_fwd(x, y, 16, "error")
    check_bwd(x, y, 16, "error", "l1", 0, out, twin, gid, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_ties_follow_index(device, dtype):
    # Few distinct values: many equal errors, which a stable sort orders by index.
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(-3, 4, (5, 999), generator=g) / 2).to(dtype=dtype, device=device)
    y = (torch.randint(-3, 4, (5, 999), generator=g) / 2).to(dtype=dtype, device=device)
    y[0] = x[0]  # a row of all-zero errors: every sort pass is trivial
    out = fwd(x, y, 8, "error")
    assert torch.equal(out[4], ref.lift_place_fwd(x, y, 8, "error", "l1", EPS)[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [2, 3, 16, 31, 32, 33, 64, 65, 129, 257, 1023])
def test_short_rows_rank_like_the_twin(device, N, dtype):
    # Rows of <= 32 elements are ranked by an insertion sort, longer ones below 1024 by radix
    # passes of about log2(N) bits: the same stable order either way, ties by index, NaN last.
    g = torch.Generator().manual_seed(N)
    R = 6
    x = (torch.randint(-3, 4, (R, N), generator=g) / 2).to(torch.float64)
    y = (torch.randint(-3, 4, (R, N), generator=g) / 2).to(torch.float64)
    x[1] = torch.randn(N, generator=g, dtype=torch.float64)  # distinct errors
    y[2] = x[2]  # all errors equal
    y[3, N // 2] = float("nan")
    y[4, 0] = -float("nan")
    x[5] = torch.randn(N, generator=g, dtype=torch.float64) * 1e30  # a wide key range
    x, y = x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)
    P = 2 if N < 4 else 4
    out = fwd(x, y, P, "error")
    twin = ref.lift_place_fwd(x, y, P, "error", "l1", EPS)
    assert torch.equal(out[4], twin[4])
    finite = torch.tensor([r not in (3, 4) for r in range(R)], device=device)
    torch.testing.assert_close(out[2][finite], twin[2][finite], rtol=2e-3, atol=1e-3)


def test_nan_rows(device):
    x, y = make_inputs(4, 300, torch.float32, device, seed=7)
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
    truth = oracle_fwd(x, y, 16, "error", "l1", 0, ref.group_ids(x, y, 16, "error"))[2]
    assert_close_to_oracle("rows", rows, twin[2], truth)
    gx, gy = OPS.lift_place_bwd(torch.ones_like(rows), None, None, x, y, out[0], out[1], out[3], out[4],
                                16, "error", "l1", 0, True)
    assert torch.isfinite(gx[0]).all() and torch.isfinite(gy[0]).all()


@pytest.mark.parametrize("grouping", ["error", "global", "patch"])
def test_deterministic(device, grouping):
    # No float atomics and a fixed summation order: bitwise equal run to run, and on the
    # CPU whatever the thread count.
    R, N, P, width = 64, 1024, 16 if grouping != "global" else 1024, 32 if grouping == "patch" else 0
    x, y = make_inputs(R, N, torch.float32, device, seed=11)
    grad_rows = torch.randn(R, ref.ROW_STATS, generator=torch.Generator().manual_seed(2)).to(device)

    def run():
        out = fwd(x, y, P, grouping, "l1", width)
        return out + bwd((grad_rows, None, None), x, y, out, P, grouping, "l1", width)

    first, second = run(), run()
    runs = [second]
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        for a, b in zip(first, other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grouping", ["error", "global", "patch"])
def test_backward_of_few_long_rows_is_split_across_threads_bitwise(grouping, dtype):
    """Fewer rows than twice the threads: the CPU backward splits each row into spans over all
    threads. The bits equal the one-row-per-task path (3 rows at 1 thread) and the twin's
    values to rounding, with grad_slope/grad_intercept and both need_grad_y settings."""
    if not ext_available("cpu"):
        pytest.skip("needs the CPU extension")
    R, N, width = 3, 256 * 320, 320  # 81,920 elements per row: three spans of 32,768 (patch: whole image rows)
    P = 16 if grouping != "global" else N
    x, y = make_inputs(R, N, dtype, "cpu", seed=5)
    g = torch.Generator().manual_seed(3)
    out = fwd(x, y, P, grouping, "l1", width if grouping == "patch" else 0)
    acc = out[0].dtype
    grads = (torch.randn(R, ref.ROW_STATS, generator=g).to(acc), torch.randn(out[0].shape, generator=g).to(acc),
             torch.randn(out[1].shape, generator=g).to(acc))
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 4):  # 3 >= 2 * 1: per row; 3 < 2 * 4: split
            torch.set_num_threads(n)
            for need_y in (True, False):
                results[n, need_y] = bwd(grads, x, y, out, P, grouping, "l1", width if grouping == "patch" else 0,
                                         need_grad_y=need_y)
    finally:
        torch.set_num_threads(threads)
    for need_y in (True, False):
        a, b = results[1, need_y], results[4, need_y]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    twin = ref.lift_place_bwd(*grads, x, y, out[0], out[1], out[3], out[4], P, grouping, "l1",
                              width if grouping == "patch" else 0, True)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[4, True][0], twin[0], **tol)
    torch.testing.assert_close(results[4, True][1], twin[1], **tol)


def test_empty_batch(device):
    x = torch.empty(0, 64, device=device)
    out = fwd(x, x, 16, "error")
    assert [tuple(t.shape) for t in out] == [(0, 4), (0, 4), (0, 7), (0, 4, 3), (0, 64)]
    gx, gy = bwd((out[2], None, None), x, x, out, 16, "error")
    assert gx.shape == (0, 64) and gy.shape == (0, 64)


@pytest.mark.parametrize("grouping, P, width", [("error", 8, 0), ("global", 48, 0), ("patch", 4, 8)])
def test_opcheck(device, grouping, P, width):
    x, y = make_inputs(3, 48, torch.float32, device, seed=13)
    x.requires_grad_(True)
    torch.library.opcheck(OPS.lift_place_fwd.default, (x, y, P, grouping, "l1", EPS, width))
    out = fwd(x.detach(), y, P, grouping, "l1", width)
    grad_rows = torch.randn(3, ref.ROW_STATS, device=device)
    torch.library.opcheck(
        OPS.lift_place_bwd.default,
        (grad_rows, torch.randn_like(out[0]), None, x.detach(), y, out[0], out[1], out[3], out[4],
         P, grouping, "l1", width, True),
    )


# ---------------------------------------------------------------------------------------
# The shared input checks (csrc/liftplace.h): the same errors from every device's kernel.

@pytest.mark.parametrize("bad, match", [
    (lambda x, y: (x, y[:, :-1], 16, "error", 0, EPS), "differ in shape"),
    (lambda x, y: (x, y.double(), 16, "error", 0, EPS), "differ in dtype"),
    (lambda x, y: (x.int(), y.int(), 16, "error", 0, EPS), "x must be float16"),
    (lambda x, y: (x, y, 1, "error", 0, EPS), "group_size"),
    (lambda x, y: (x, y, 65, "error", 0, EPS), "group_size"),
    (lambda x, y: (x, y, 8, "patch", 8, EPS), "square"),
    (lambda x, y: (x, y, 16, "patch", 6, EPS), "divisible"),
    (lambda x, y: (x, y, 16, "rank", 0, EPS), "grouping must be"),
    (lambda x, y: (x.t(), y.t(), 4, "error", 0, EPS), "contiguous"),
    (lambda x, y: (x[:, :1].contiguous(), y[:, :1].contiguous(), 16, "global", 0, EPS), "at least 2 elements"),
    (lambda x, y: (x, y, 16, "error", 0, 0.0), "eps must be positive"),
    (lambda x, y: (x, y, 16, "error", 0, float("nan")), "eps must be positive"),
])
def test_fwd_input_errors(device, bad, match):
    x, y = make_inputs(8, 64, torch.float32, device)
    xb, yb, P, grouping, width, eps = bad(x, y)
    with pytest.raises(RuntimeError, match=match):
        OPS.lift_place_fwd(xb, yb, P, grouping, "l1", eps, width)


def _bwd_args(device, grouping="error"):
    x, y = make_inputs(2, 64, torch.float32, device)
    out = fwd(x, y, 16, grouping)
    return dict(grad_rows=out[2], grad_slope=None, grad_intercept=None, x=x, y=y, slope=out[0],
                intercept=out[1], aux=out[3], group_id=out[4])


def _call_bwd(a, grouping="error", need_grad_y=False):
    return OPS.lift_place_bwd(a["grad_rows"], a["grad_slope"], a["grad_intercept"], a["x"], a["y"], a["slope"],
                              a["intercept"], a["aux"], a["group_id"], 16, grouping, "l1", 0, need_grad_y)


@pytest.mark.parametrize("name, make, match", [
    # The backward takes x and y as the forward does: contiguous only (no silent copy).
    ("x", lambda a: torch.cat([a["x"], a["x"]], 1)[:, ::2], "contiguous"),
    ("y", lambda a: torch.cat([a["y"], a["y"]], 1)[:, ::2], "contiguous"),
    ("slope", lambda a: a["slope"][:, :-1], "slope of shape"),
    ("aux", lambda a: a["aux"][..., :2], "aux of shape"),
    ("grad_rows", lambda a: a["grad_rows"][:, :6], "grad_rows of shape"),
    ("grad_slope", lambda a: torch.zeros(2, 3, device=a["x"].device), "grad_slope of shape"),
    ("group_id", lambda a: a["group_id"].long(), "group_id int32"),
    ("group_id", lambda a: a["group_id"][:, :-1], "group_id int32"),
])
def test_bwd_input_errors(device, name, make, match):
    a = _bwd_args(device)
    a[name] = make(a)
    with pytest.raises(RuntimeError, match=match):
        _call_bwd(a)


@pytest.mark.parametrize("value", [99, 4, -1])
def test_bwd_rejects_foreign_group_id(value):
    # CPU: the kernel skips the id (never indexes with it) and raises afterwards.
    a = _bwd_args("cpu")
    a["group_id"] = a["group_id"].clone()
    a["group_id"][0, 0] = value
    with pytest.raises(RuntimeError, match=r"group_id values outside \[0, G=4\)"):
        _call_bwd(a)


def _run_python(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


@CUDA_ONLY
def test_bwd_rejects_foreign_group_id_cuda(device, tmp_path):
    # CUDA checks the ids on the device, without a host sync: a device-side assert, which
    # poisons the CUDA context, hence a subprocess.
    proc = _run_python("""
        import torch, liftplace
        x = torch.randn(2, 64, device="cuda"); y = 0.5 * x + torch.randn_like(x)
        out = torch.ops.liftplace.lift_place_fwd(x, y, 16, "error", "l1", 1e-7, 0)
        gid = out[4].clone(); gid[0, 0] = 99
        torch.ops.liftplace.lift_place_bwd(out[2], None, None, x, y, out[0], out[1], out[3], gid,
                                           16, "error", "l1", 0, False)
        torch.cuda.synchronize()
        print("NO ERROR")
    """, cwd=tmp_path)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout
    assert "device-side assert" in proc.stderr or "group_id" in proc.stderr, proc.stderr[-2000:]


@CUDA_ONLY
@pytest.mark.parametrize("name", ["y", "slope", "intercept", "aux", "grad_rows", "grad_slope", "group_id"])
def test_bwd_rejects_wrong_device(device, name):
    # Every tensor argument must be on x's device: a host pointer must never reach a kernel.
    a = _bwd_args(device)
    a["grad_slope"] = torch.zeros_like(a["slope"])
    a[name] = a[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
        _call_bwd(a)


@CUDA_ONLY
def test_x_on_the_wrong_device(device):
    # A CPU x with a CUDA statistic dispatches to the CUDA kernel, which must refuse it.
    a = _bwd_args(device)
    a["x"], a["y"] = a["x"].cpu(), a["y"].cpu()
    with pytest.raises(RuntimeError, match="kernel for cuda got x on cpu"):
        _call_bwd(a)
    x, y = make_inputs(2, 64, torch.float32, device)
    with pytest.raises(RuntimeError, match="y is on cpu but x is on cuda"):
        fwd(x, y.cpu(), 16, "error")
    with pytest.raises(RuntimeError, match="timesteps are on cpu"):
        OPS.bucket_stats(torch.randn(4, 3, device=device), torch.arange(4), 2, 4.0)


# ---------------------------------------------------------------------------------------
# bucket_stats

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_stats_parity(device, dtype):
    g = torch.Generator().manual_seed(3)
    B, S, K, T = 37, 5, 6, 1000.0
    values = (torch.randn(B, S, generator=g, dtype=torch.float64) * 10 + 3).to(dtype=dtype, device=device)
    t = torch.cat([torch.randint(0, 1000, (B - 3,), generator=g).double(),
                   torch.tensor([-5.0, 1e9, float("nan")])]).to(device)
    for ts in (t.nan_to_num(0).long(), t.float(), t):
        sums, counts, bucket = OPS.bucket_stats(values, ts, K, T)
        twin = ref.bucket_stats(values, ts, K, T)
        truth = ref.bucket_stats(values.double(), ts, K, T)[0]
        assert torch.equal(bucket, twin[2]) and torch.equal(counts, twin[1])
        assert sums.dtype == twin[0].dtype
        assert_close_to_oracle("sums", sums, twin[0], truth)
        again = OPS.bucket_stats(values, ts, K, T)
        assert all(torch.equal(p, q) for p, q in zip((sums, counts, bucket), again))


@pytest.mark.parametrize("args, match", [
    (lambda v, t: (v[0], t, 4, 10.0), r"values must be \[B, S\]"),
    (lambda v, t: (v, t[:-1], 4, 10.0), r"timesteps must be \[B\]"),
    (lambda v, t: (v, t, 0, 10.0), "num_buckets must be >= 1"),
    (lambda v, t: (v, t, 4, 0.0), "t_max must be > 0"),
    (lambda v, t: (v.int(), t, 4, 10.0), "values must be float16"),
])
def test_bucket_input_errors(device, args, match):
    v, t = torch.randn(6, 3, device=device), torch.arange(6, device=device)
    with pytest.raises(RuntimeError, match=match):
        OPS.bucket_stats(*args(v, t))


# ---------------------------------------------------------------------------------------
# The CPU kernels' two ISA builds

ISA_CASES = [(g, N, P, w, dt) for g, N, P, w in [("error", 1000, 16, 0), ("global", 1001, 1001, 0),
                                                  ("patch", 32 * 32, 16, 32)]
             for dt in ("float32", "float64", "bfloat16")]

ISA_SCRIPT = """
    import sys, torch, liftplace
    cases, inputs = torch.load(sys.argv[1])
    outs = []
    for (grouping, N, P, width, _), (x, y, grad_rows) in zip(cases, inputs):
        out = torch.ops.liftplace.lift_place_fwd(x, y, P, grouping, "l2", 1e-7, width)
        outs.append(out + torch.ops.liftplace.lift_place_bwd(grad_rows, None, None, x, y, out[0], out[1], out[3],
                                                             out[4], P, grouping, "l2", width, True))
    torch.save(outs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def isa_runs(tmp_path_factory):
    """Outputs of every ISA case from the default build (AVX2 where the CPU has it) and from
    the baseline build, forced by LIFTPLACE_CPU_ISA=base. The variable is read once per
    process, so each build runs in its own subprocess."""
    if not ext_available("cpu"):
        pytest.skip("liftplace was built without its cpu kernels")
    d = tmp_path_factory.mktemp("isa")
    inputs = []
    for _, N, _, _, dt in ISA_CASES:
        x, y = make_inputs(6, N, getattr(torch, dt), seed=17)
        grad_rows = torch.randn(6, ref.ROW_STATS, generator=torch.Generator().manual_seed(3))
        inputs.append((x, y, grad_rows.to(ref.acc_dtype(x.dtype))))
    torch.save((ISA_CASES, inputs), d / "in.pt")
    runs = {}
    for isa in ("native", "base"):
        env = {"LIFTPLACE_CPU_ISA": isa}
        code = "import sys; sys.argv[1:] = [%r, %r]\n" % (str(d / "in.pt"), str(d / f"{isa}.pt"))
        proc = _run_python(code + textwrap.dedent(ISA_SCRIPT), env=env, cwd=d)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[isa] = torch.load(d / f"{isa}.pt")
    return runs


@pytest.mark.parametrize("index", range(len(ISA_CASES)), ids=lambda i: "-".join(map(str, ISA_CASES[i][::2])))
def test_isa_builds_agree(isa_runs, index):
    # The kernels are built for the baseline ISA and for AVX2 (picked at run time); AVX2
    # without FMA rounds lane for lane like the scalar code, so results are bitwise equal.
    for a, b in zip(isa_runs["native"][index], isa_runs["base"][index]):
        assert torch.equal(a, b)


def test_bench_stub_switch_only_with_its_variable():
    """LIFTPLACE_BENCH_STUB_KERNELS=1 (bench_loss.py --stub-kernels) makes both CPU kernels
    skip their work; without it (every other test) they compute."""
    if not ext_available("cpu"):
        pytest.skip("liftplace was built without its cpu kernels")
    code = textwrap.dedent("""
        import torch, liftplace
        x = torch.randn(4, 64) + 3; y = 2 * x
        out = torch.ops.liftplace.lift_place_fwd(x, y, 16, "error", "l1", 1e-7, 0)
        print(float(out[2].abs().sum()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "LIFTPLACE_BENCH_STUB_KERNELS"}
    normal = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    stubbed = subprocess.run([sys.executable, "-c", code], env={**env, "LIFTPLACE_BENCH_STUB_KERNELS": "1"},
                             capture_output=True, text=True, timeout=120)
    assert normal.returncode == 0 and stubbed.returncode == 0, normal.stderr + stubbed.stderr
    assert float(normal.stdout.split()[-1]) > 0 and float(stubbed.stdout.split()[-1]) == 0.0
