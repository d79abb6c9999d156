import math

import pytest
import torch

from recurra.layers.plstm import PLSTM2D, PLSTMLayer
from recurra.ops.plstm import (
    plstm_1d_chunked,
    plstm_1d_reference,
    plstm_2d_reference,
    plstm_2d_wavefront,
)
from recurra.testing import check_layer_contract, check_learns_lag_two_recall

D64 = torch.float64


def _rand(gen):
    return lambda *s: torch.randn(*s, generator=gen, dtype=D64)


def _problem_1d(seed=0, B=2, T=11, H=3, dk=4, dv=5):
    r = _rand(torch.Generator().manual_seed(seed))
    q, k, v = r(B, T, H, dk), r(B, T, H, dk), r(B, T, H, dv)
    S, M, Dd = r(B, T, H), r(B, T, H), r(B, T, H)
    Tt = torch.tanh(2 * r(B, T, H))  # negative transitions too (D-mode)
    Tt[0, 3, 1] = 0.0  # an exact zero
    return q, k, v, S, Tt, M, Dd, r(B, H, dk, dv)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_1d_chunked_equals_loop(chunk):
    args = _problem_1d()
    for state in (None, args[-1]):
        y_r, c_r = plstm_1d_reference(*args[:-1], state=state)
        y_f, c_f = plstm_1d_chunked(*args[:-1], state=state, chunk=chunk)
        torch.testing.assert_close(y_f, y_r, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(c_f, c_r, atol=1e-12, rtol=1e-10)


def test_1d_chunked_gradients_equal_loop():
    args = list(_problem_1d(seed=1, T=9))
    args[4] = torch.tanh(torch.randn(2, 9, 3, dtype=D64))  # no exact zero (log|T| has no grad)
    leaves = [a.requires_grad_(True) for a in args]
    gen = torch.Generator().manual_seed(2)
    outs_r = plstm_1d_reference(*leaves[:-1], state=leaves[-1])
    outs_f = plstm_1d_chunked(*leaves[:-1], state=leaves[-1], chunk=4)
    cot = [torch.randn(o.shape, generator=gen, dtype=D64) for o in outs_r]
    g_r = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs_r, cot)), leaves)
    g_f = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs_f, cot)), leaves)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def _problem_2d(X, Y, seed=0, B=2, H=2, dk=3, dv=2):
    r = _rand(torch.Generator().manual_seed(seed))
    q, k, v = r(B, X, Y, H, dk), r(B, X, Y, H, dk), r(B, X, Y, H, dv)
    return q, k, v, [r(B, X, Y, H) for _ in range(9)]


@pytest.mark.parametrize("X,Y", [(1, 1), (1, 6), (5, 1), (3, 5), (4, 4)])
def test_2d_wavefront_equals_node_loop(X, Y):
    q, k, v, gates = _problem_2d(X, Y)
    leaves = [q, k, v, *gates]
    for a in leaves:
        a.requires_grad_(True)
    h_r, _ = plstm_2d_reference(q, k, v, *gates)
    h_f = plstm_2d_wavefront(q, k, v, *gates)
    torch.testing.assert_close(h_f, h_r, atol=1e-12, rtol=1e-10)
    cot = torch.randn(h_r.shape, generator=torch.Generator().manual_seed(9), dtype=D64)
    g_r = torch.autograd.grad((h_r * cot).sum(), leaves, allow_unused=True)
    g_f = torch.autograd.grad((h_f * cot).sum(), leaves, allow_unused=True)
    for leaf, a, b in zip(leaves, g_f, g_r):  # unused: gates of edges that leave the grid
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_2d_column_is_the_1d_chain():
    # a 1 x Y grid is a chain along y: only "up" edges carry state (T^du, S^d, M^u)
    q, k, v, g = _problem_2d(1, 7, seed=3)
    s_r, s_d, t_rl, t_ru, t_dl, t_du, m_l, m_u, direct = g
    h2, _ = plstm_2d_reference(q, k, v, *g)
    h1, _ = plstm_1d_reference(q[:, 0], k[:, 0], v[:, 0], s_d[:, 0], t_du[:, 0], m_u[:, 0],
                               direct[:, 0])
    torch.testing.assert_close(h2[:, 0], h1, atol=1e-12, rtol=1e-10)


def test_2d_impulse_reaches_only_the_lower_right_quadrant():
    q, k, v, g = _problem_2d(5, 6, seed=4)
    v = v.clone().requires_grad_(True)
    h = plstm_2d_wavefront(q, k, v, *g)
    h[:, 2, 3].sum().backward()
    reach = v.grad.abs().sum((0, 3, 4)) > 0  # (X, Y): inputs that influence node (2, 3)
    expect = torch.zeros(5, 6, dtype=torch.bool)
    expect[:3, :4] = True
    assert torch.equal(reach, expect)


def _grid_states(module, x, override=None):
    b, X, Y, _ = x.shape
    h, dk, dv = module.heads, module.key_dim, module.head_dim
    q, k = module.to_qk(x).view(b, X, Y, 2, h, dk).unbind(3)
    v = module.to_v(x).view(b, X, Y, h, dv)
    q, k, v = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True), v / v.norm(
        dim=-1, keepdim=True)
    gates = list(module.gates(x)[0])
    if override:
        override(gates)
    _, biggest = plstm_2d_wavefront(q, k, v, *gates, return_states=True)
    return biggest.max().item()


@pytest.mark.parametrize("mode", ["P", "D"])
def test_state_stays_bounded_on_64x64_and_explodes_without_the_constraint(mode):
    torch.manual_seed(0)
    module = PLSTM2D(8, heads=1, head_dim=4, mode=mode).double()
    with torch.no_grad():
        module.to_gates.bias.view(module.n_gates, 4, 1)[:, 0].fill_(2.0)  # long-range gates
        x = torch.randn(1, 64, 64, 8, dtype=D64)
        bounded = _grid_states(module, x)
        # |k v^T| <= 1 and gates <= 1. P-mode: the transitions out of an edge are a split of its
        # mass, so a bound linear in the grid side holds here; D-mode: at most one path from each
        # source to each edge, so |C| <= number of nodes
        assert bounded < (64 if mode == "P" else 64 * 64)

        def unconstrained(gates):
            if mode == "P":  # every transition 0.9: the two out of an edge sum to 1.8
                for i in (2, 3, 4, 5):
                    gates[i] = torch.full_like(gates[i], 0.9)
            else:  # both cross transitions on: the line graph is no longer a multitree
                gates[4] = gates[3]

        exploded = _grid_states(module, x, unconstrained)
    assert exploded > 1e6 * max(bounded, 1.0)


def test_2d_module_equals_per_orientation_loop():
    torch.manual_seed(1)
    for mode in ("P", "D"):
        module = PLSTM2D(4, heads=2, head_dim=2, mode=mode).double()
        x = torch.randn(2, 3, 4, 4, dtype=D64)
        y = module(x)
        b, X, Y, _ = x.shape
        q, k = module.to_qk(x).view(b, X, Y, 2, 2, 2).unbind(3)
        q = q / math.sqrt(2)
        v = module.to_v(x).view(b, X, Y, 2, 2)
        total = 0
        for flips, gates in zip(PLSTM2D.ORIENTATIONS, module.gates(x)):
            fl = (lambda a: a.flip(flips)) if flips else (lambda a: a)
            h, _ = plstm_2d_reference(fl(q), fl(k), fl(v), *(fl(g) for g in gates))
            total = total + fl(h)
        expect = module.to_out((total / 4).reshape(b, X, Y, 4))
        torch.testing.assert_close(y, expect, atol=1e-12, rtol=1e-10)
        if mode == "P":  # outgoing transitions of each incoming edge sum to 1
            g = module.gates(x)[0]
            torch.testing.assert_close(g[2] + g[4], torch.ones_like(g[2]))
            torch.testing.assert_close(g[0] + g[1], torch.ones_like(g[0]))
    with pytest.raises(ValueError, match="x must have shape"):
        module(torch.randn(2, 3, 4))


@pytest.mark.parametrize("mode,chunk", [("P", 4), ("D", 3)])
def test_plstm_contract(mode, chunk):
    torch.manual_seed(0)
    layer = PLSTMLayer(4, heads=2, head_dim=2, key_dim=2, mode=mode, chunk=chunk)
    check_layer_contract(layer, steps=9)


def test_bad_options():
    with pytest.raises(ValueError, match="mode"):
        PLSTMLayer(4, mode="X")
    with pytest.raises(ValueError, match="chunk"):
        PLSTMLayer(4, chunk=0)
    with pytest.raises(ValueError, match="heads"):
        PLSTM2D(4, heads=0)


def test_trains_inside_recurrent_lm():
    check_learns_lag_two_recall("plstm", dict(heads=2, chunk=8))
