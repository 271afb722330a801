"""torch.compile(fullgraph=True) traces the loss without graph breaks and matches eager."""

import os
import shutil

import pytest
import torch

import liftplace
from testing import backend, backends, make_pair


# Inductor's CPU backend compiles C++ at run time (an installed wheel needs no compiler, this does).
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile's CPU backend needs a C++ compiler on PATH")
@pytest.mark.parametrize("name", backends("cpu"))
@pytest.mark.parametrize("grouping", ["error", "global"])
def test_compile_fullgraph_matches_eager(name, grouping):
    torch._dynamo.reset()
    x, y = make_pair((2, 3, 8, 8), torch.float32, "cpu", seed=0)

    def step(a, b):
        loss, stats = liftplace.lift_place_loss(a, b, grouping=grouping, return_stats=True)
        return loss, stats["weight"]

    with backend(name):
        eager = step(x, y)
        (g_eager,) = torch.autograd.grad(eager[0], [x])
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if grouping == "global" else "inductor")
        out = compiled(x, y)
        (g_out,) = torch.autograd.grad(out[0], [x])
    torch.testing.assert_close(out[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], eager[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_out, g_eager, rtol=1e-4, atol=1e-6)
