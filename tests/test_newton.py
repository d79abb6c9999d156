"""NewtonSolver (ParaRNN/DEER): Jacobians, prefix property, convergence, implicit gradients,
divergence fallback. Oracles: torch.func.jacrev and the sequential loop with autograd."""

import warnings

import pytest
import torch
from torch import nn

from recurra.layers.paragru import ParaGRUCell
from recurra.layers.paralstm import ParaLSTMCell
from recurra.ops.newton import (
    NewtonCell,
    NewtonDivergenceError,
    NewtonFallbackWarning,
    NewtonSolver,
    autograd_jacobian,
    newton_iterates,
    sequential_solve,
)

F64 = torch.float64


def _gru(d, std, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return ParaGRUCell(d, std).to(dtype)


def _lstm(d, std, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return ParaLSTMCell(d, std).to(dtype)


def _problem(cell, batch, steps, d, seed=1, dtype=F64, u_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    u = u_scale * torch.randn(batch, steps, 3, d, generator=gen, dtype=dtype)
    shape = (batch, d) if cell.structure == "diagonal" else (batch, d, 2)
    h0 = 0.5 * torch.randn(shape, generator=gen, dtype=dtype)
    return u, h0


class TanhDense(NewtonCell):
    """A dense cell h' = tanh(W h + u) (Jacobian by autograd, structure "dense")."""

    structure = "dense"

    def __init__(self, d, scale, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(scale * torch.randn(d, d, generator=gen, dtype=F64) / d ** 0.5)

    def step(self, u, h):
        return torch.tanh(h @ self.w.T + u)


class Chaotic(NewtonCell):
    """A deliberately unstable (chaotic) diagonal cell: |dh'/dh| up to 4."""

    structure = "diagonal"

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.full((d,), 4.0, dtype=F64))

    def step(self, u, h):
        return 2.0 * torch.sin(self.gain * h) + 0.1 * u


# ------------------------------------------------------------------------- Jacobians
@pytest.mark.parametrize("make", [_gru, _lstm])
def test_closed_form_jacobian_equals_jacrev(make):
    d, batch = 5, 3
    cell = make(d, std=1.5)  # large recurrences: every term of the Jacobian matters
    u, h = _problem(cell, batch, 1, d, seed=2)
    u = u[:, 0]
    h = h + 0.3 * torch.randn(h.shape, dtype=F64)
    full = torch.func.jacrev(lambda hh: cell.step(u, hh))(h)  # (B, *S, B, *S)
    closed = cell.jacobian(u, h)
    if cell.structure == "diagonal":
        full = full.reshape(batch * d, batch * d)
        diag = torch.diagonal(full)
        torch.testing.assert_close(closed.reshape(-1), diag, atol=1e-12, rtol=1e-12)
        off = full - torch.diag(diag)
        assert bool((off == 0).all()), "off-diagonal Jacobian entries must be exactly 0"
    else:
        full = full.reshape(batch * d, 2, batch * d, 2)
        idx = torch.arange(batch * d)
        blocks = full[idx, :, idx, :]  # (B*D, 2, 2)
        torch.testing.assert_close(closed.reshape(-1, 2, 2), blocks, atol=1e-12, rtol=1e-12)
        mask = torch.ones(batch * d, batch * d, dtype=torch.bool)
        mask[idx, idx] = False
        assert bool((full.permute(0, 2, 1, 3)[mask] == 0).all()), \
            "entries outside the per-channel 2x2 blocks must be exactly 0"
    # the autograd (VJP) Jacobian agrees with the closed form for these structured cells
    torch.testing.assert_close(autograd_jacobian(cell.step, u, h, cell.structure), closed,
                               atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------- prefix property
@pytest.mark.parametrize("make", [_gru, _lstm])
def test_prefix_property_any_parameters(make):
    d, steps = 4, 12
    cell = make(d, std=2.5, seed=3)  # not contractive: Newton is far from converged
    u, h0 = _problem(cell, 2, steps, d, seed=4, u_scale=2.0)
    seq = sequential_solve(cell, u, h0).detach()
    iterates = newton_iterates(cell, u, h0, steps)
    for k, h in enumerate(iterates):
        torch.testing.assert_close(h[:, :k + 1], seq[:, :k + 1], atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"iterate {k}: {m}")
    # with T iterations the whole sequence is exact
    torch.testing.assert_close(iterates[-1], seq, atol=1e-12, rtol=1e-12)
    # and the test is not trivial: early iterates are far off beyond their prefix
    assert (iterates[1] - seq).abs().max() > 1e-3


def test_prefix_property_with_damping():
    cell = _gru(4, std=2.0, seed=5)
    u, h0 = _problem(cell, 2, 10, 4, seed=6)
    seq = sequential_solve(cell, u, h0).detach()
    for k, h in enumerate(newton_iterates(cell, u, h0, 6, damping=0.5)):
        torch.testing.assert_close(h[:, :k + 1], seq[:, :k + 1], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("make", [_gru, _lstm])
def test_converged_equals_sequential_float64(make):
    d = 8
    cell = make(d, std=2 / (5 * d) ** 0.5, seed=7)
    u, h0 = _problem(cell, 3, 500, d, seed=8)
    solver = NewtonSolver()
    h = solver.solve(cell, u, h0)
    torch.testing.assert_close(h, sequential_solve(cell, u, h0), atol=1e-10, rtol=0)
    assert solver.last.converged and not solver.last.fell_back
    assert solver.last.iterations <= 8, solver.last


@pytest.mark.parametrize("make", [_gru, _lstm])
def test_converged_equals_sequential_float32_long(make):
    d = 16
    cell = make(d, std=2 / (5 * d) ** 0.5, seed=9, dtype=torch.float32)
    u, h0 = _problem(cell, 2, 4096, d, seed=10, dtype=torch.float32)
    solver = NewtonSolver()
    with torch.no_grad():
        h = solver.solve(cell, u, h0)
        ref = sequential_solve(cell.double(), u.double(), h0.double())
    torch.testing.assert_close(h.double(), ref, atol=1e-5, rtol=0)
    assert solver.last.converged and solver.last.iterations <= 8


def test_fixed_iterations_records_count_and_is_close():
    d = 16
    cell = _gru(d, std=2 / (5 * d) ** 0.5, seed=11)
    u, h0 = _problem(cell, 2, 1000, d, seed=12)
    solver = NewtonSolver(iterations=3)
    h = solver.solve(cell, u, h0)
    assert solver.last.iterations == 3 and len(solver.last.step_norms) == 3
    err = (h - sequential_solve(cell, u, h0)).abs().max().item()
    assert 0 < err < 1e-2  # ParaRNN's 3 iterations: close, not exact
    solver.solve(cell, u, h0)
    assert solver.calls == 2 and len(solver.history) == 2


def test_dense_cell_with_autograd_jacobian():
    d = 5
    cell = TanhDense(d, scale=0.9)
    gen = torch.Generator().manual_seed(13)
    u = torch.randn(2, 60, d, generator=gen, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, d, generator=gen, dtype=F64, requires_grad=True)
    solver = NewtonSolver()
    h = solver.solve(cell, u, h0)
    ref = sequential_solve(cell, u, h0)
    torch.testing.assert_close(h, ref, atol=1e-10, rtol=0)
    g = torch.randn(h.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((h * g).sum(), (u, h0, cell.w))
    want = torch.autograd.grad((ref * g).sum(), (u, h0, cell.w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_mask_makes_padding_the_identity():
    d = 4
    cell = _lstm(d, std=0.8, seed=14)
    u, h0 = _problem(cell, 3, 20, d, seed=15)
    lengths = torch.tensor([20, 0, 7])
    mask = torch.arange(20).unsqueeze(0) < lengths.unsqueeze(1)
    h = NewtonSolver().solve(cell, u, h0, mask)
    torch.testing.assert_close(h, sequential_solve(cell, u, h0, mask), atol=1e-10, rtol=0)
    torch.testing.assert_close(h[1], h0[1].expand(20, d, 2))
    torch.testing.assert_close(h[2, -1], sequential_solve(cell, u[2:, :7], h0[2:])[0, -1])


# ------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("make", [_gru, _lstm])
def test_implicit_gradients_equal_autograd_through_loop(make):
    d = 6
    cell = make(d, std=0.6, seed=16)
    u, h0 = _problem(cell, 2, 200, d, seed=17)
    mask = torch.arange(200).unsqueeze(0) < torch.tensor([[200], [150]])
    u.requires_grad_(True)
    h0.requires_grad_(True)
    params = list(cell.parameters())
    g = torch.randn(u.shape[:2] + h0.shape[1:], dtype=F64,
                    generator=torch.Generator().manual_seed(18))
    solver = NewtonSolver(atol=1e-13)
    got = torch.autograd.grad((solver.solve(cell, u, h0, mask) * g).sum(), [u, h0, *params])
    want = torch.autograd.grad((sequential_solve(cell, u, h0, mask) * g).sum(),
                               [u, h0, *params])
    names = ["u", "h0"] + [n for n, _ in cell.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("make", [_gru, _lstm])
def test_gradcheck(make):
    d = 4
    cell = make(d, std=0.7, seed=19)
    u, h0 = _problem(cell, 2, 16, d, seed=20)
    names = [n for n, _ in cell.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in cell.parameters())
    solver = NewtonSolver(atol=1e-14)

    def fn(u, h0, *ps):
        return torch.func.functional_call(
            _Solve(cell, solver), {f"cell.{n}": p for n, p in zip(names, ps)}, (u, h0))

    assert torch.autograd.gradcheck(fn, (u.requires_grad_(True), h0.requires_grad_(True),
                                         *params))


class _Solve(nn.Module):
    def __init__(self, cell, solver):
        super().__init__()
        self.cell, self.solver = cell, solver

    def forward(self, u, h0):
        return self.solver.solve(self.cell, u, h0)


# ------------------------------------------------------------------------- divergence
def _chaotic_problem():
    cell = Chaotic(3)
    gen = torch.Generator().manual_seed(21)
    u = torch.randn(2, 300, 3, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, generator=gen, dtype=F64)
    return cell, u, h0


@pytest.mark.parametrize("options", [dict(), dict(iterations=3), dict(max_iters=5)])
def test_unstable_cell_falls_back_with_a_warning_and_the_right_answer(options):
    cell, u, h0 = _chaotic_problem()
    ref = sequential_solve(cell, u, h0).detach()
    # the raw iteration really is wrong here
    raw = newton_iterates(cell, u, h0, 3)[-1]
    assert not bool(torch.isfinite(raw).all()) or (raw - ref).abs().max() > 1e-3
    solver = NewtonSolver(**options)
    with pytest.warns(NewtonFallbackWarning, match="sequential loop"):
        h = solver.solve(cell, u, h0)
    assert solver.last.fell_back and solver.fallbacks == 1
    torch.testing.assert_close(h, ref, atol=1e-12, rtol=0)
    # warned once per solver: the second fallback is recorded but silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver.solve(cell, u, h0)
    assert solver.fallbacks == 2


def test_unstable_cell_strict_raises():
    cell, u, h0 = _chaotic_problem()
    with pytest.raises(NewtonDivergenceError, match="strict"):
        NewtonSolver(strict=True).solve(cell, u, h0)


def test_no_fallback_for_a_contractive_cell():
    cell = _gru(8, std=0.3)
    u, h0 = _problem(cell, 2, 300, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NewtonSolver().solve(cell, u, h0)
        NewtonSolver(iterations=3).solve(cell, u, h0)


# ------------------------------------------------------------------------- user cell (docs)
def test_user_defined_cell_example_from_docs():
    # the example of docs/pararnn.md
    class LeakyTanh(NewtonCell):
        structure = "diagonal"

        def __init__(self, d):
            super().__init__()
            self.a = nn.Parameter(torch.full((d,), 0.5))

        def step(self, u, h):
            return 0.5 * h + 0.5 * torch.tanh(self.a * h + u)

    cell = LeakyTanh(8)
    u = torch.randn(4, 1000, 8)
    h0 = torch.zeros(4, 8)
    solver = NewtonSolver()
    h = solver.solve(cell, u, h0)  # (4, 1000, 8), differentiable
    h.sum().backward()
    assert solver.last.converged and solver.last.iterations < 10
    ref = sequential_solve(cell, u, h0)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=0)
    grad = cell.a.grad.clone()
    cell.a.grad = None
    ref.sum().backward()
    torch.testing.assert_close(grad, cell.a.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(iterations=-1), "iterations"), (dict(iterations=3, atol=1e-6), "either iterations"),
    (dict(atol=-1.0), "atol"), (dict(max_iters=0), "max_iters"), (dict(damping=1.0), "damping"),
])
def test_bad_solver_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NewtonSolver(**kwargs)


def test_bad_solve_inputs():
    cell = _gru(4, 0.3)
    u, h0 = _problem(cell, 2, 5, 4)
    with pytest.raises(ValueError, match="initial_state"):
        NewtonSolver().solve(cell, u, h0[:1])
    with pytest.raises(ValueError, match="mask"):
        NewtonSolver().solve(cell, u, h0, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cell"):
        NewtonSolver().solve(object(), u, h0)
