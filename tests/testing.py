"""The shared test matrix and helpers (one place, like pytorch_scatter's testing.py)."""

from __future__ import annotations

import contextlib
import math

import torch

import liftplace

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GROUPINGS = ["global", "error", "patch"]
NORMS = ["l1", "l2"]
REDUCTIONS = ["sum", "mean"]
PARTS = ["both", "coarse", "fine"]
WEIGHTS = ["adaptive", "constant", "linear", "cosine"]
COARSE_WEIGHTS = ["constant", "anneal"]

# (shape, group_size): odd sizes, N % P != 0, B = 1, C = 1, P = 2, a single group.
SHAPES = [
    ((2, 3, 8, 8), 16),
    ((1, 1, 7, 9), 5),       # N = 63, ragged last group for "error"
    ((3, 1, 4, 4), 2),
    ((1, 2, 6, 6), 36),      # one group per row
    ((2, 4, 12, 12), 9),     # patch 3x3
    ((2, 2, 5, 13), 7),
]

EXT_CPU = liftplace.backend_info()["cpu_ext"]
EXT_CUDA = liftplace.backend_info()["cuda_ext"]


def ext_available(device: str) -> bool:
    return EXT_CPU if device == "cpu" else EXT_CUDA


def backends(device: str):
    """Backends to compare on a device: always the pure-torch path, and the extension where built."""
    return ["torch"] + (["ext"] if ext_available(device) else [])


@contextlib.contextmanager
def backend(name: str):
    old = liftplace.get_backend()
    liftplace.set_backend(name)
    try:
        yield
    finally:
        liftplace.set_backend(old)


def fits(shape, group_size, grouping) -> bool:
    """Whether a (shape, group_size) pair is a valid input for a grouping."""
    if grouping != "patch":
        return True
    p = int(round(group_size ** 0.5))
    return len(shape) == 4 and p * p == group_size and shape[2] % p == 0 and shape[3] % p == 0


def make_pair(shape, dtype, device, *, seed, related=True, requires_grad=True):
    """A student/teacher pair; `related` makes the teacher a noisy affine map of the student."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if related:
        y = 0.8 * x + 0.1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    y = y.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return x, y


def naive_groups(x_row, y_row, P, grouping, width):
    """Index sets of one row's groups, written straight from METHOD.md §3."""
    N = x_row.numel()
    if grouping == "global":
        return [list(range(N))]
    if grouping == "patch":
        p = int(round(P ** 0.5))
        H = N // width
        return [[(i * p + di) * width + j * p + dj for di in range(p) for dj in range(p)]
                for i in range(H // p) for j in range(width // p)]
    # Rank by the error at the inputs' own precision (upcast to at least float32).
    acc = torch.float64 if x_row.dtype == torch.float64 else torch.float32
    e = (y_row.to(acc) - x_row.to(acc)) ** 2
    order = sorted(range(N), key=lambda i: (e[i].item(), i))
    G = N // P
    groups = [order[g * P:(g + 1) * P] for g in range(G)]
    groups[-1] = groups[-1] + order[G * P:]
    return groups


def naive_loss(student, teacher, *, group_size=16, grouping="error", norm="l1", reduction="sum",
               weight="adaptive", parts="both", coarse_weight="constant", eps=1e-7, step=None,
               total_steps=None):
    """An independent float64 evaluation of the loss, one group at a time (slow, obvious).

    Returns (loss, grad_student, grad_teacher) by autograd in float64.
    """
    B, C = student.shape[:2]
    N = student[0, 0].numel()
    width = student.shape[-1] if grouping == "patch" else 0
    xs = student.detach().reshape(B * C, N)
    ys = teacher.detach().reshape(B * C, N)
    xd = xs.double().clone().requires_grad_(True)
    yd = ys.double().clone().requires_grad_(True)
    coarse = fine = xd.new_zeros(())
    absdev, count = 0.0, 0
    for r in range(B * C):
        for idx in naive_groups(xs[r], ys[r], group_size, grouping, width):
            idx = torch.tensor(idx)
            x, y = xd[r, idx], yd[r, idx]
            mx, my = x.mean(), y.mean()
            vx = ((x - mx) ** 2).mean()
            a = ((x - mx) * (y - my)).mean() / (vx + eps)
            b = my - a * mx
            c = (a - 1).abs() + b.abs() if norm == "l1" else (a - 1) ** 2 + b ** 2
            coarse = coarse + len(idx) * c
            fine = fine + ((a.detach() * x + b.detach() - y) ** 2).sum()
            absdev += (a - 1).abs().item() + b.abs().item()
            count += 1
    scale = 1.0 / B if reduction == "sum" else 1.0 / (B * C * N)
    coarse, fine = coarse * scale, fine * scale
    if weight == "adaptive":
        w = 1.0 - min(1.0, absdev / count)
    elif weight == "constant":
        w = 1.0
    else:
        t = min(1.0, step / total_steps)
        w = t if weight == "linear" else 0.5 * (1 - math.cos(math.pi * t))
    cw = 1.0 - w if coarse_weight == "anneal" else 1.0
    loss = {"both": cw * coarse + w * fine, "coarse": coarse, "fine": fine}[parts]
    gx, gy = torch.autograd.grad(loss, [xd, yd])
    return loss.detach(), gx.reshape(student.shape), gy.reshape(teacher.shape)


# A tiny diffusers UNet2DModel config for trainer tests (built in memory, nothing downloaded).
TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                 norm_num_groups=4)
