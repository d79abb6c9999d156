"""The named experiments of ``recurra eval`` (each a list of cells; ``default`` = all of them).

Every suite tests one claim of the papers recurra follows (EVALUATION.md reports the verdicts):

- ``state_tracking``: nonlinear RNNs (lstm, gru, slstm, paragru) track parity and S5 state at
  lengths where linear recurrences (linear_attention, mamba2, s4d) fail (FlashRNN, xLSTM);
- ``jrt``: causal recall of set disjointness depends on which set comes first (short set first
  vs long set first); reading the context twice (JRT-Prompt, on both orders) and the
  prefix-linear-attention ``jrt`` layer close the gap;
- ``stuffed_mamba``: mamba2 trained on short passkey contexts collapses beyond them; the test-time
  mitigations restore accuracy; passkey capacity grows with the state size; and the trained
  mitigation (the same model trained on 4x longer contexts);
- ``length_generalisation``: copy and reverse beyond the training length, recurrent layers vs a
  Transformer (Universal Transformers);
- ``smoke``: one tiny cell per claim type, seconds on CPU (CI).
"""

from __future__ import annotations

from .specs import CellSpec

#: sLSTM with one head: its default 4 heads make the recurrence block-diagonal (4 x 16 units),
#: which learns S5 much more slowly (loss 0.74 against 0.17 after 2,500 steps)
STATE_TRACKING_MODELS = ("lstm", "gru", "slstm:num_heads=1", "paragru", "linear_attention",
                         "mamba2", "s4d")
#: S5 word problem over the 10 transpositions (they generate S5; see recurra.tasks.state_tracking)
S5_TASK = "s5:inputs=transpositions"
JRT_MODELS = ("gru", "linear_attention", "mamba2", "jrt")
LENGTH_MODELS = ("lstm", "gru", "linear_attention", "mamba2", "transformer")
#: passkey with a 2-digit key, so two-layer models learn retrieval at the training length
PASSKEY_TASK = "passkey:key_digits=2"
PASSKEY_STATE_SIZES = (4, 16, 64)
PASSKEY_MODEL = "mamba2:n_layers=2:d_state={n}"
#: training-free mitigations of state collapse (mamba2 options applied at test time only):
#: forget more, remember less, and a sliding window shorter than the training length
PASSKEY_MITIGATIONS = ("decay_scale=2", "insert_scale=0.5", "window=32")
PASSKEY_TRAIN, PASSKEY_TESTS = 64, (64, 128, 256, 512, 1024)

#: training steps and time cap (s) per task kind for the ``small`` budget; ``full`` doubles
#: both, other budgets (smoke) keep their own. Parity keeps the budget's steps. Measured on an
#: idle 2-core machine, no cell comes near its cap (EVALUATION.md, "Runtime").
SMALL_STEPS = {"s5": (4000, 300), "jrt": (1500, 180), "copy": (3000, 240),
               "passkey": (600, 300)}


def _steps(kind: str, budget: str) -> tuple[tuple[str, float], ...]:
    if kind not in SMALL_STEPS or budget not in ("small", "full"):
        return ()
    factor = 2 if budget == "full" else 1
    steps, cap = SMALL_STEPS[kind]
    return (("steps", steps * factor), ("max_train_seconds", cap * factor))


def _grid(tasks, models, train_length, test_lengths, seed, overrides=()):
    return [CellSpec(t, m, train_length, tuple(test_lengths), seed, tuple(overrides))
            for t in tasks for m in models]


def suite_cells(name: str, seed: int = 0, budget: str = "small") -> list[CellSpec]:
    """The cells of suite ``name``; ``budget`` (a budget name) sizes the per-task steps."""
    if name == "state_tracking":
        return (_grid(["parity"], STATE_TRACKING_MODELS, 16, (8, 16, 32, 64, 128), seed)
                + _grid([S5_TASK], STATE_TRACKING_MODELS, 16, (8, 16, 32, 64), seed,
                        _steps("s5", budget)))
    if name == "jrt":
        base = "set_disjointness:n_items=32:short_size=2"
        orders = [f"{base}:order=short_first", f"{base}:order=long_first"]
        steps = _steps("jrt", budget)
        # JRT-Prompt (read the context twice) on both orders, for the causal models only
        return (_grid(orders, JRT_MODELS, 8, (4, 8, 16, 24), seed, steps)
                + _grid([f"{o}:jrt_prompt=true" for o in orders],
                        [m for m in JRT_MODELS if m != "jrt"], 8, (4, 8, 16, 24), seed, steps))
    if name == "stuffed_mamba":
        # capacity against state size: random needle depth (train and test)
        capacity = [PASSKEY_MODEL.format(n=n) for n in PASSKEY_STATE_SIZES] + ["gru:n_layers=2"]
        # collapse and its fixes: the same trained d_state=16 model, needle at the end at test
        base = PASSKEY_MODEL.format(n=16)
        collapse = [base] + [f"{base}@{m}" for m in PASSKEY_MITIGATIONS]
        steps = _steps("passkey", budget)
        cells = (_grid([PASSKEY_TASK], capacity, PASSKEY_TRAIN, PASSKEY_TESTS, seed, steps)
                 + _grid([PASSKEY_TASK + "@depth=1"], collapse, PASSKEY_TRAIN, PASSKEY_TESTS,
                         seed, steps))
        # the trained mitigation: continual training of the same model on 4x longer contexts
        # (400 steps at the short length, where it learns retrieval, then 300 at 4x; trained
        # from scratch at 4x it stays at chance for 600 steps)
        factor = 2 if budget == "full" else 1
        continual = (("steps", 700 * factor), ("max_train_seconds", 300 * factor),
                     ("warm_start_steps", 400 * factor), ("warm_start_length", PASSKEY_TRAIN))
        return cells + _grid([PASSKEY_TASK + "@depth=1", PASSKEY_TASK], [base],
                             4 * PASSKEY_TRAIN, PASSKEY_TESTS, seed, continual)
    if name == "length_generalisation":
        return _grid(["copy", "reverse"], LENGTH_MODELS, 8, (4, 8, 12, 16, 24, 32), seed,
                     _steps("copy", budget))
    if name == "smoke":
        return (_grid(["parity"], ["lstm"], 16, (16, 32), seed)
                + _grid(["set_disjointness:n_items=16:short_size=2"], ["gru"], 4, (4, 8), seed))
    if name == "default":
        return [c for s in ("state_tracking", "jrt", "length_generalisation", "stuffed_mamba")
                for c in suite_cells(s, seed, budget)]
    raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")


SUITES = ("default", "state_tracking", "jrt", "stuffed_mamba", "length_generalisation", "smoke")


def grid_cells(tasks, models, seed: int = 0, train_length: int | None = None,
               test_lengths=None) -> list[CellSpec]:
    """Cells for every (task, model) pair, with each task's default lengths unless given."""
    from ..tasks.registry import build_task
    from .specs import split_test_options

    cells = []
    for t in tasks:
        task = build_task(split_test_options(t)[0])
        train = train_length or task.default_train_length
        tests = tuple(test_lengths or task.default_test_lengths)
        cells += [CellSpec(t, m, train, tests, seed) for m in models]
    return cells
