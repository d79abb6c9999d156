"""Triton kernels of ParaRNN, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Oracles: the torch linear_scan and the torch Newton step of the same ParaGRU cell. Skipped when
triton is not installed (it is optional)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first triton import: triton reads it once. Harmless for other tests: on a
    # machine without CUDA, triton kernels can only run interpreted anyway.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from recurra.layers.paragru import ParaGRU
from recurra.ops.linear_scan import linear_scan_reference
from recurra.ops.newton import initial_guess, newton_step

F64 = torch.float64


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("steps", [1, 37])
def test_triton_scan_matches_loop(steps):
    from recurra.ops.newton_triton import linear_scan_triton

    gen = torch.Generator().manual_seed(steps)
    a = 2 * torch.rand(2, steps, 11, generator=gen, dtype=F64) - 1
    a[:, ::4] = 0
    b = torch.randn(2, steps, 11, generator=gen, dtype=F64)
    h0 = torch.randn(2, 11, generator=gen, dtype=F64)
    dev = _device()
    # small blocks: several time chunks (carries) and a partial channel block
    out = linear_scan_triton(a.to(dev), b.to(dev), h0.to(dev), block_t=8, block_d=8)
    torch.testing.assert_close(out.cpu(), linear_scan_reference(a, b, h0), atol=1e-12,
                               rtol=1e-12)


def _layer():
    torch.manual_seed(0)
    return ParaGRU(6, recurrent_std=0.6).double()


def test_fused_paragru_newton_step_matches_torch_step():
    from recurra.ops.newton_triton import paragru_newton_step_triton

    layer = _layer()
    cell = layer.cell
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 6, generator=gen, dtype=F64)
    h0 = torch.randn(3, 6, generator=gen, dtype=F64)
    mask = torch.arange(17)[None] < torch.tensor([[17], [0], [9]])
    with torch.no_grad():
        u = layer.project(x)  # a strided (B, T, 3, D) view: the kernel takes strides
        for m in (None, mask):
            h = initial_guess(cell, u, h0, m)
            for _ in range(2):
                want = newton_step(cell, u, h0, h, m)
                got = paragru_newton_step_triton(u, h0, h, cell.a_z, cell.a_r, cell.a_h, m,
                                                 block_t=8, block_d=4)
                torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
                h = want


def test_triton_backend_in_solver_and_layer():
    layer = _layer()
    layer.solver = type(layer.solver)(backend="triton")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 23, 6, generator=gen, dtype=F64, requires_grad=True)
    y, _ = layer(x)
    assert layer.solver.last.converged and not layer.solver.last.fell_back
    layer.mode = "sequential"
    y_ref, _ = layer(x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    gx = torch.autograd.grad(y.sum(), x)[0]
    gx_ref = torch.autograd.grad(y_ref.sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-8)


def test_triton_backend_needs_a_fused_cell():
    from recurra.layers.paralstm import ParaLSTM
    from recurra.ops.newton import NewtonSolver

    layer = ParaLSTM(4)
    u = torch.zeros(1, 3, 3, 4)
    with pytest.raises(ValueError, match="newton_step_triton"):
        NewtonSolver(backend="triton").solve(layer.cell, u, torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="backend"):
        NewtonSolver(backend="cuda")
