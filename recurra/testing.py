"""Checks of the layer contract, for recurra's own tests and for users' custom layers.

``check_layer_contract(layer)`` runs, in float64 on a small random problem:
1. parallel == step-by-step (causal layers);
2. one pass == chunks with the state carried;
3. a padded batch with ``lengths`` == a per-sequence loop (and padded outputs are zero);
4. gradients of 1-3 agree for the input, every parameter and the initial state, under random
   cotangents on both the outputs and the final state;
5. ``torch.autograd.gradcheck`` on a tiny size.
Each check raises AssertionError naming what differs and by how much.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .layers.base import RecurrentLayer, State

StateSampler = Callable[[RecurrentLayer, int, torch.Generator], State]


def random_state(layer: RecurrentLayer, batch: int, gen: torch.Generator) -> State:
    """A non-trivial initial state: the empty state plus Gaussian noise of scale 0.5."""
    base = layer.init_state(batch)
    return tuple(s + 0.5 * torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in base)


def _close(name: str, a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> None:
    if a is None and b is None:
        return
    if a is None or b is None:
        raise AssertionError(f"{name}: one side has no gradient")
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        diff = (a - b).abs().max().item()
        raise AssertionError(f"{name}: max abs difference {diff:.3g} (atol {atol}, rtol {rtol})")


def _grads(layer: RecurrentLayer, run: Callable[[], tuple[torch.Tensor, State]],
           inputs: list[torch.Tensor], gy: torch.Tensor, gs: State):
    """Gradients of <y, gy> + <state, gs> w.r.t. ``inputs`` and the layer's parameters."""
    params = [p for p in layer.parameters() if p.requires_grad]
    y, state = run()
    loss = (y * gy).sum() + sum((s * g).sum() for s, g in zip(state, gs))
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return y.detach(), tuple(s.detach() for s in state), grads


def _run_steps(layer: RecurrentLayer, x: torch.Tensor, state: State):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = layer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def _run_chunks(layer: RecurrentLayer, x: torch.Tensor, state: State, splits: list[int]):
    ys, start = [], 0
    for end in [*splits, x.shape[1]]:
        y, state = layer(x[:, start:end], state)
        ys.append(y)
        start = end
    return torch.cat(ys, 1), state


def _run_per_sequence(layer: RecurrentLayer, x: torch.Tensor, state: State,
                      lengths: torch.Tensor):
    ys, finals = [], []
    for b in range(x.shape[0]):
        row = layer.reorder_state(state, torch.tensor([b]))
        n = int(lengths[b])
        if n > 0:
            y, row = layer(x[b:b + 1, :n], row)
        else:
            y = x.new_zeros(1, 0, layer.output_size)
        pad = x.new_zeros(1, x.shape[1] - n, layer.output_size)
        ys.append(torch.cat([y, pad], 1))
        finals.append(row)
    final = tuple(torch.cat(parts, layer.state_batch_dim) for parts in zip(*finals))
    return torch.cat(ys, 0), final


def check_layer_contract(
    layer: RecurrentLayer,
    batch: int = 3,
    steps: int = 9,
    atol: float = 1e-9,
    rtol: float = 1e-7,
    seed: int = 0,
    state_sampler: StateSampler = random_state,
    gradcheck_steps: int = 3,
    skip: tuple[str, ...] = (),
) -> None:
    """Run the contract checks on a float64 copy of ``layer`` (see the module docstring).

    ``skip`` may name checks that do not apply ("step", "chunks", "padding", "gradcheck"); a
    non-causal layer skips "step" and "chunks" by itself.
    """
    layer = copy.deepcopy(layer).double()
    layer.eval()  # dropout off: the paths must compute the same function
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, layer.input_size, generator=gen, dtype=torch.float64)
    state0 = state_sampler(layer, batch, gen)
    x.requires_grad_(True)
    state0 = tuple(s.clone().requires_grad_(True) for s in state0)
    inputs = [x, *state0]

    gy, gs = _cotangents(layer, x, state0, gen)
    y_ref, s_ref, g_ref = _grads(layer, lambda: layer(x, state0), inputs, gy, gs)
    names = ["x"] + [f"state0[{i}]" for i in range(len(state0))] + [
        n for n, p in layer.named_parameters() if p.requires_grad]

    def compare(tag, run):
        y, s, g = _grads(layer, run, inputs, gy, gs)
        _close(f"{tag}: output", y, y_ref, atol, rtol)
        for i, (a, b) in enumerate(zip(s, s_ref)):
            _close(f"{tag}: final state[{i}]", a, b, atol, rtol)
        for name, a, b in zip(names, g, g_ref):
            _close(f"{tag}: gradient of {name}", a, b, atol, rtol)

    causal = layer.causal
    if causal and "step" not in skip:
        compare("step-by-step vs parallel", lambda: _run_steps(layer, x, state0))
    if causal and "chunks" not in skip and steps >= 3:
        splits = sorted({1, steps // 2, steps - 1})
        compare(f"chunks {splits} vs one pass", lambda: _run_chunks(layer, x, state0, splits))
    if "padding" not in skip:
        lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
        lengths[0] = steps
        if batch > 1:
            lengths[1] = 0 if causal else max(1, steps // 3)
        mask = (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        # the padding holds garbage: it must not matter
        garbage = 1e3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x_pad = torch.where(mask, x, garbage)
        y_a, s_a, g_a = _grads(layer, lambda: layer(x_pad, state0, lengths=lengths), inputs,
                               gy, gs)
        y_b, s_b, g_b = _grads(layer, lambda: _run_per_sequence(layer, x, state0, lengths),
                               inputs, gy, gs)
        tag = f"padded batch (lengths {lengths.tolist()}) vs per-sequence loop"
        _close(f"{tag}: output", y_a, y_b, atol, rtol)
        for i, (a, b) in enumerate(zip(s_a, s_b)):
            _close(f"{tag}: final state[{i}]", a, b, atol, rtol)
        for name, a, b in zip(names, g_a, g_b):
            _close(f"{tag}: gradient of {name}", a, b, atol, rtol)
    if "gradcheck" not in skip:
        _gradcheck(layer, gen, state_sampler, gradcheck_steps)


def _cotangents(layer, x, state0, gen):
    with torch.no_grad():
        y, s = layer(x, state0)
    return (torch.randn(y.shape, generator=gen, dtype=torch.float64),
            tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in s))


def _gradcheck(layer: RecurrentLayer, gen: torch.Generator, state_sampler: StateSampler,
               steps: int) -> None:
    batch = 2
    x = torch.randn(batch, steps, layer.input_size, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    state0 = tuple(s.detach().requires_grad_(True)
                   for s in state_sampler(layer, batch, gen))
    params = [p for p in layer.parameters() if p.requires_grad]
    n_state = len(state0)

    def fn(x, *rest):
        s0 = tuple(rest[:n_state])
        y, s = torch.func.functional_call(
            layer, dict(zip([n for n, p in layer.named_parameters() if p.requires_grad],
                            rest[n_state:])), (x, s0))
        return (y, *s)

    # fast mode checks random projections of the Jacobian (one backward per output), which
    # is what makes gradcheck affordable on every layer
    ok = torch.autograd.gradcheck(fn, (x, *state0, *params), eps=1e-6, atol=1e-5, rtol=1e-4,
                                  raise_exception=True, fast_mode=True)
    assert ok


def check_trains_in_language_model(layer: str, layer_options: dict | None = None,
                                   steps: int = 30, seed: int = 0) -> None:
    """A 2-block RecurrentLM over ``layer`` learns a simple sequence (loss halves within
    ``steps`` Adam steps), and decoding token by token gives the parallel pass's logits."""
    from .models.recurrent_lm import RecurrentLM

    torch.manual_seed(seed)
    model = RecurrentLM(vocab_size=12, d_model=16, n_layers=2, layer=layer,
                        layer_options=layer_options or {})
    # learnable data: each token is the previous one plus 3 (mod 10), random starts
    tokens = (torch.randint(0, 10, (8, 1)) + 3 * torch.arange(24)) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if not losses[-1] < 0.5 * losses[0]:
        raise AssertionError(f"{layer}: loss did not halve in {steps} steps: {losses}")
    model.eval()
    with torch.no_grad():
        logits, _ = model(tokens[:2, :10])
        state = None
        for t in range(10):
            step_logits, state = model.step(tokens[:2, t], state)
            _close(f"{layer}: step logits at t={t}", step_logits, logits[:, t], 1e-4, 1e-4)


def check_learns_lag_two_recall(layer: str, layer_options: dict | None = None,
                                steps: int = 20) -> None:
    """A 1-block RecurrentLM over ``layer`` learns to output the token two steps back (a task
    that needs the layer's memory): within ``steps`` AdamW steps the loss falls from about ln 8
    to under 0.75 of its start."""
    from .models.recurrent_lm import RecurrentLM

    torch.manual_seed(0)
    model = RecurrentLM(8, 16, 1, layer=layer, layer_options=layer_options or {}, mlp_ratio=2)
    x = torch.randint(0, 8, (8, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 8),
                                                 x[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if not losses[0] > 1.9:  # ~ln 8
        raise AssertionError(f"{layer}: initial loss {losses[0]:.3f} is not near ln 8")
    if not losses[-1] < 0.75 * losses[0]:
        raise AssertionError(f"{layer}: loss did not fall below 0.75 of its start: {losses}")
