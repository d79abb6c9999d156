"""Parallel evaluation of a nonlinear recurrence by Newton's method (ParaRNN / DEER).

A *cell* maps precomputed input projections and the previous state to the next state,
``h_t = f(u_t, h_{t-1})``, batched over any leading axes. Solving for all states at once is a
root-finding problem in the unknowns h_1..h_T. One Newton step linearises every step around the
current iterate and solves the resulting *linear* recurrence with one associative scan::

    J_t = df/dh(u_t, h^k_{t-1}),   h^{k+1}_t = J_t h^{k+1}_{t-1} + f(u_t, h^k_{t-1}) - J_t h^k_{t-1}

(with ``h_0`` the given initial state). Two facts make this work:

- *prefix property*: whatever the Jacobians, after k iterations the first k+1 states are exact,
  so the iteration ends after at most T steps in exact arithmetic;
- for contractive cells (|J| < 1, the usual small-recurrence initialisation) it converges
  quadratically: ParaRNN uses a fixed 3 iterations.

Jacobian structures (``cell.structure``):

- ``"diagonal"``: the state has any shape (B, ...), ``J`` has the state's shape;
- ``"block"``: the state is (B, ..., K) and ``J`` is (B, ..., K, K): a K x K block per channel
  (e.g. LSTM's [c, h] pair: K = 2);
- ``"dense"``: the state is (B, D) and ``J`` is (B, D, D) (one block; O(D^3) per combine).

A cell defines ``step(u, h_prev)`` and, preferably, a closed-form ``jacobian(u, h_prev)`` (or
``step_and_jacobian`` to share the gates). Without one, :func:`autograd_jacobian` computes it with
1 (diagonal) or K (block/dense) vector-Jacobian products, which is exact only when the Jacobian
really has the declared structure.

The backward pass never differentiates through the iterations. By the implicit function theorem
it is one reverse linear scan for the adjoint ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}``, then one
batched vector-Jacobian product of ``f(u, h_prev)`` with ``lambda`` for the inputs ``u``, the
cell's parameters and the initial state. This is the exact gradient at the fixed point (and the
true RNN gradient evaluated at the returned states after a fixed number of iterations).

Divergence is never silent: if the Newton step turns non-finite or grows, or the tolerance is not
met within ``max_iters``, the solver recomputes that call with the sequential loop and warns
(:class:`NewtonFallbackWarning`, once per solver) or raises :class:`NewtonDivergenceError` when
``strict=True``.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .linear_scan import linear_scan

STRUCTURES = ("diagonal", "block", "dense")


class NewtonFallbackWarning(UserWarning):
    """Newton diverged or did not converge; the call was recomputed with the sequential loop."""


class NewtonDivergenceError(RuntimeError):
    """Newton diverged or did not converge and the solver was built with ``strict=True``."""


class NewtonCell(nn.Module):
    """Base class for cells solved by :class:`NewtonSolver` (subclass and define ``step``).

    ``step(u, h_prev)`` must be batched over any leading axes and use only torch operations on
    ``u``, ``h_prev`` and the module's own parameters (their gradients come from one VJP).
    """

    #: "diagonal", "block" (K x K per channel, state (..., K)) or "dense" (state (B, D))
    structure: str = "diagonal"

    def step(self, u: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def jacobian(self, u: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """d step / d h_prev in the cell's structure; by autograd unless overridden."""
        return autograd_jacobian(self.step, u, h_prev, self.structure)

    def step_and_jacobian(self, u: torch.Tensor, h_prev: torch.Tensor):
        """``(step(u, h_prev), jacobian(u, h_prev))``; override to share the gates."""
        return self.step(u, h_prev), self.jacobian(u, h_prev)


def autograd_jacobian(step, u: torch.Tensor, h_prev: torch.Tensor, structure: str) -> torch.Tensor:
    """The Jacobian of ``step`` w.r.t. ``h_prev`` from vector-Jacobian products.

    diagonal: one VJP with ones (the column sums, equal to the diagonal only if J is diagonal);
    block / dense: K VJPs with one-hot cotangents on the last axis (rows of each block).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    with torch.enable_grad():
        hp = h_prev.detach().requires_grad_(True)
        out = step(u.detach(), hp)
        if structure == "diagonal":
            (jac,) = torch.autograd.grad(out, hp, torch.ones_like(out))
            return jac
        k = out.shape[-1]
        rows = []
        for i in range(k):
            cot = torch.zeros_like(out)
            cot[..., i] = 1
            (row,) = torch.autograd.grad(out, hp, cot, retain_graph=i < k - 1)
            rows.append(row)
        return torch.stack(rows, -2)


# ----------------------------------------------------------------------------- helpers
def _check_cell(cell) -> str:
    if not isinstance(cell, nn.Module) or not callable(getattr(cell, "step", None)):
        raise ValueError("cell must be an nn.Module (e.g. a NewtonCell) defining step(u, h_prev), "
                         f"got {type(cell).__name__}")
    structure = getattr(cell, "structure", "diagonal")
    if structure not in STRUCTURES:
        raise ValueError(f"cell.structure must be one of {STRUCTURES}, got {structure!r}")
    return structure


def _check_inputs(u, initial_state, mask):
    if not isinstance(u, torch.Tensor) or u.dim() < 2:
        raise ValueError("u must be a tensor of shape (batch, time, ...) (input projections), got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    if not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor, got {u.dtype}")
    if not isinstance(initial_state, torch.Tensor) or initial_state.dim() < 1 \
            or initial_state.shape[0] != u.shape[0]:
        got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else \
            type(initial_state).__name__
        raise ValueError(f"initial_state must be a tensor of shape ({u.shape[0]}, ...) (the "
                         f"state before the first step, batch first), got {got}")
    if initial_state.dtype != u.dtype or initial_state.device != u.device:
        raise ValueError(f"initial_state must have dtype {u.dtype} on {u.device} like u, got "
                         f"{initial_state.dtype} on {initial_state.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or tuple(mask.shape) != tuple(u.shape[:2]):
            raise ValueError(f"mask must be None or a bool tensor of shape {tuple(u.shape[:2])} "
                             "(batch, time): True where a step is taken")


def _expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(tuple(mask.shape) + (1,) * (like.dim() - 2))


def _identity_like(jac: torch.Tensor, structure: str) -> torch.Tensor:
    if structure == "diagonal":
        return torch.ones_like(jac)
    return torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device).expand_as(jac)


def _masked_step(cell, u, hp, mask):
    out = cell.step(u, hp)
    if mask is not None:
        out = torch.where(_expand_mask(mask, out), out, hp)
    return out


def _masked_step_and_jacobian(cell, structure, u, hp, mask):
    out, jac = cell.step_and_jacobian(u, hp)
    if mask is not None:
        m = _expand_mask(mask, out)
        out = torch.where(m, out, hp)
        jac = torch.where(_expand_mask(mask, jac), jac, _identity_like(jac, structure))
    return out, jac


def _apply(jac, h, structure):
    if structure == "diagonal":
        return jac * h
    return (jac * h.unsqueeze(-2)).sum(-1)


def _shift(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """(h_0, h_1, ..., h_{T-1}): the previous state of every step."""
    return torch.cat([h0.unsqueeze(1), h[:, :-1]], 1)


def _cell_params(cell: nn.Module) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Names and tensors of the cell's trainable parameters."""
    named = [(n, p) for n, p in cell.named_parameters() if p.requires_grad]
    return [n for n, _ in named], tuple(p for _, p in named)


class _CellCall(nn.Module):
    """Wraps a module cell so that torch.func.functional_call can substitute its parameters."""

    def __init__(self, cell, structure):
        super().__init__()
        self.cell = cell
        self.structure = structure

    def forward(self, u, hp, mask):
        return _masked_step_and_jacobian(self.cell, self.structure, u, hp, mask)


def _step_and_jacobian_with(cell, structure, names, params, u, hp, mask):
    """step and Jacobian evaluated with ``params`` in place of the cell's parameters."""
    return torch.func.functional_call(
        _CellCall(cell, structure), {f"cell.{n}": p for n, p in zip(names, params)},
        (u, hp, mask))


# ----------------------------------------------------------------------------- reference loop
def sequential_solve(cell, u: torch.Tensor, initial_state: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """All states by the plain loop ``h_t = step(u_t, h_{t-1})`` (autograd through it).

    With ``mask`` (B, T) the step is skipped (state kept) where the mask is False.
    """
    _check_cell(cell)
    _check_inputs(u, initial_state, mask)
    h, out = initial_state, []
    masks = mask.unbind(1) if mask is not None else [None] * u.shape[1]
    for u_t, m_t in zip(u.unbind(1), masks):
        new = cell.step(u_t, h)
        if m_t is not None:
            new = torch.where(m_t.view((-1,) + (1,) * (new.dim() - 1)), new, h)
        h = new
        out.append(h)
    if not out:
        return initial_state.new_zeros((u.shape[0], 0) + tuple(initial_state.shape[1:]))
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- Newton
def initial_guess(cell, u, initial_state, mask=None) -> torch.Tensor:
    """ParaRNN's guess: h_1 = f(u_1, h_0) (exact) and h_t = f(u_t, 0) for t > 1."""
    hp = _shift(initial_state.new_zeros((u.shape[0], u.shape[1]) + tuple(initial_state.shape[1:])),
                initial_state)
    return _masked_step(cell, u, hp, mask)


def newton_step(cell, u, initial_state, h, mask=None, damping: float = 0.0) -> torch.Tensor:
    """One Newton step from iterate ``h`` (B, T, ...): linearise every step, solve by one scan.

    ``damping`` in [0, 1) scales the Jacobians by (1 - damping) (quasi-DEER/ELK-style damped
    step); any Jacobian approximation keeps the prefix property.
    """
    structure = getattr(cell, "structure", "diagonal")
    hp = _shift(h, initial_state)
    out, jac = _masked_step_and_jacobian(cell, structure, u, hp, mask)
    if damping:
        jac = (1.0 - damping) * jac
    return linear_scan(jac, out - _apply(jac, hp, structure), initial_state)


def newton_iterates(cell, u, initial_state, iterations: int, mask=None,
                    damping: float = 0.0) -> list[torch.Tensor]:
    """The raw iterates h^0 (the initial guess) .. h^iterations, without any safeguard.

    For analysis and tests (e.g. the prefix property); use :class:`NewtonSolver` to compute.
    """
    _check_cell(cell)
    _check_inputs(u, initial_state, mask)
    with torch.no_grad():
        h = initial_guess(cell, u, initial_state, mask)
        out = [h]
        for _ in range(iterations):
            h = newton_step(cell, u, initial_state, h, mask, damping)
            out.append(h)
    return out


@dataclass
class NewtonStats:
    """What one solver call did."""

    iterations: int
    converged: bool
    fell_back: bool
    reason: str = ""
    #: max |h^{k+1} - h^k| of every iteration
    step_norms: list[float] = field(default_factory=list)


class NewtonSolver:
    """Solves ``h_t = cell.step(u_t, h_{t-1})`` for all t with Newton iterations + linear scans.

    Args:
        iterations: run exactly this many iterations (ParaRNN: 3). Exclusive with tolerances.
        atol, rtol: otherwise iterate until ``|h^{k+1} - h^k| <= atol + rtol |h^{k+1}|``
            everywhere (defaults by dtype: float64 1e-12 / 0, float32 1e-6 / 1e-6, half 1e-3).
        max_iters: tolerance mode gives up (fallback) after this many iterations.
        damping: scale Jacobians by (1 - damping) for cells that are not contractive
            (slower, linear convergence, but the products of Jacobians stay bounded).
        strict: raise :class:`NewtonDivergenceError` instead of falling back to the loop.
        backend: "torch" (default) or "triton": the iterations use the cell's fused Triton
            Newton step (``cell.newton_step_triton``; ParaGRU has one; needs a GPU, or
            TRITON_INTERPRET=1 on a CPU for testing). The backward is the same either way.

    ``solver.last`` holds the :class:`NewtonStats` of the latest call and ``solver.history`` the
    recent ones (``solver.calls``, ``solver.fallbacks`` count all calls).
    """

    def __init__(self, iterations: int | None = None, atol: float | None = None,
                 rtol: float | None = None, max_iters: int = 50, damping: float = 0.0,
                 strict: bool = False, history: int = 1000, backend: str = "torch"):
        if iterations is not None:
            if not isinstance(iterations, int) or iterations < 0:
                raise ValueError(f"iterations must be None or an int >= 0, got {iterations!r}")
            if atol is not None or rtol is not None:
                raise ValueError("give either iterations (a fixed count) or atol/rtol "
                                 "(a tolerance), not both")
        for name, v in (("atol", atol), ("rtol", rtol)):
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be None or a float >= 0, got {v!r}")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
        if not (isinstance(damping, (int, float)) and 0 <= damping < 1):
            raise ValueError(f"damping must be a float in [0, 1), got {damping!r}")
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        if backend == "triton" and damping:
            raise ValueError("damping is not supported by backend='triton' (use 'torch')")
        self.backend = backend
        self.iterations = iterations
        self.atol, self.rtol = atol, rtol
        self.max_iters = max_iters
        self.damping = float(damping)
        self.strict = bool(strict)
        self.history: collections.deque[NewtonStats] = collections.deque(maxlen=history)
        self.last: NewtonStats | None = None
        self.calls = 0
        self.fallbacks = 0
        self._warned = False

    def __repr__(self) -> str:
        mode = (f"iterations={self.iterations}" if self.iterations is not None else
                f"atol={self.atol}, rtol={self.rtol}, max_iters={self.max_iters}")
        return (f"NewtonSolver({mode}, damping={self.damping}, strict={self.strict}, "
                f"backend={self.backend!r})")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        if dtype == torch.float64:
            atol, rtol = 1e-12, 0.0
        elif dtype == torch.float32:
            atol, rtol = 1e-6, 1e-6
        else:
            atol, rtol = 1e-3, 1e-3
        return (self.atol if self.atol is not None else atol,
                self.rtol if self.rtol is not None else rtol)

    # ------------------------------------------------------------------ public
    def solve(self, cell, u: torch.Tensor, initial_state: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """All states (B, T, ...) of the recurrence; differentiable (implicit backward) w.r.t.
        ``u``, ``initial_state`` and the cell's parameters.

        ``mask`` (B, T) bool: where False the step is the identity (padding).
        """
        _check_cell(cell)
        _check_inputs(u, initial_state, mask)
        if self.backend == "triton" and not callable(getattr(cell, "newton_step_triton", None)):
            raise ValueError(f"backend='triton' needs a cell with a fused Triton Newton step "
                             f"(newton_step_triton); {type(cell).__name__} has none")
        names, params = _cell_params(cell)
        return _NewtonFunction.apply(self, cell, names, mask, u, initial_state, *params)

    # ------------------------------------------------------------------ forward iteration
    def _forward(self, cell, u, h0, mask) -> torch.Tensor:
        self.calls += 1
        steps = u.shape[1]
        fixed = self.iterations is not None
        limit = self.iterations if fixed else self.max_iters
        atol, rtol = self.tolerances(u.dtype)
        floor = 64 * torch.finfo(u.dtype).eps
        h = initial_guess(cell, u, h0, mask)
        norms: list[float] = []
        reason, converged = "", False
        if not bool(torch.isfinite(h).all()):
            reason = "the initial guess is not finite"
        elif steps <= 1 and not fixed:
            converged = True  # the guess is exact for T = 1
        k = 0
        while not reason and not converged and k < limit:
            if self.backend == "triton":
                new = cell.newton_step_triton(u, h0, h, mask)
            else:
                new = newton_step(cell, u, h0, h, mask, self.damping)
            delta = (new - h).abs()
            k += 1
            norm = float(delta.max()) if delta.numel() else 0.0
            norms.append(norm)
            h = new
            if not torch.isfinite(torch.tensor(norm)) or not bool(torch.isfinite(h).all()):
                reason = f"the Newton step turned non-finite at iteration {k}"
                break
            scale = float(h.abs().max()) if h.numel() else 0.0
            if len(norms) >= 2 and norm > norms[-2] and norm > floor * max(1.0, scale):
                reason = (f"the Newton step grew at iteration {k} "
                          f"({norms[-2]:.3g} -> {norm:.3g})")
                break
            if not fixed and bool((delta <= atol + rtol * h.abs()).all()):
                converged = True
        if fixed and not reason:
            converged = True
        if not reason and not converged:
            reason = (f"no convergence to atol={atol:g}, rtol={rtol:g} within "
                      f"{self.max_iters} iterations (last step {norms[-1]:.3g})")
        stats = NewtonStats(k, converged and not reason, bool(reason), reason, norms)
        if reason:
            self.fallbacks += 1
            message = (f"NewtonSolver: {reason} for {type(cell).__name__} at T={steps}; "
                       "recomputed this call with the sequential loop")
            if self.strict:
                self.last = stats
                self.history.append(stats)
                raise NewtonDivergenceError(message + " (strict=True: raising instead)")
            if not self._warned:
                warnings.warn(message + " (warned once per solver; see solver.history)",
                              NewtonFallbackWarning, stacklevel=4)
                self._warned = True
            h = sequential_solve(cell, u, h0, mask)
        self.last = stats
        self.history.append(stats)
        return h


class _NewtonFunction(torch.autograd.Function):
    """Newton forward; implicit-function-theorem backward (reverse scan + one VJP)."""

    @staticmethod
    def forward(ctx, solver, cell, names, mask, u, h0, *params):
        with torch.no_grad():
            h = solver._forward(cell, u, h0, mask)
        ctx.cell, ctx.names, ctx.mask = cell, names, mask
        ctx.save_for_backward(u, h0, h, *params)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        u, h0, h, *params = ctx.saved_tensors
        cell, mask = ctx.cell, ctx.mask
        structure = getattr(cell, "structure", "diagonal")
        hp = _shift(h, h0)
        # the backward may run after a torch.func.functional_call context ended: evaluate the
        # cell with the very parameter tensors the forward received
        params = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            hp_ = hp.detach().requires_grad_(True)
            out, jac = _step_and_jacobian_with(cell, structure, ctx.names, params, u_, hp_, mask)
        jac = jac.detach()
        # lambda_t = g_t + J_{t+1}^T lambda_{t+1}
        jac_t = jac if structure == "diagonal" else jac.transpose(-1, -2)
        coef = torch.cat([jac_t[:, 1:], torch.zeros_like(jac_t[:, :1])], 1)
        lam = linear_scan(coef, grad_h.contiguous(), reverse=True)
        wrt = [u_, hp_, *params]
        grads = torch.autograd.grad(out, wrt, lam, allow_unused=True)
        grad_u, grad_hp, grad_params = grads[0], grads[1], grads[2:]
        grad_h0 = grad_hp[:, 0] if grad_hp is not None else None
        return (None, None, None, None, grad_u, grad_h0, *grad_params)


def solve(cell, u: torch.Tensor, initial_state: torch.Tensor, mask: torch.Tensor | None = None,
          **solver_options) -> torch.Tensor:
    """One-off :meth:`NewtonSolver.solve` (``solver_options`` as for :class:`NewtonSolver`)."""
    return NewtonSolver(**solver_options).solve(cell, u, initial_state, mask)


