"""The named experiments of ``recurra eval`` (each a list of cells; ``default`` = all of them).

Every suite tests one claim of the papers recurra follows (EVALUATION.md reports the verdicts):

- ``state_tracking``: nonlinear RNNs (lstm, gru, slstm, paragru) track parity and S5 state at
  lengths where linear recurrences (linear_attention, mamba2, s4d) fail (FlashRNN, xLSTM);
- ``jrt``: causal recall of set disjointness depends on which set comes first (short set first
  vs long set first); reading the context twice (JRT-Prompt, on the hard order) and the
  prefix-linear-attention ``jrt`` layer close the gap;
- ``stuffed_mamba``: mamba2 trained on short passkey contexts collapses beyond them; the test-time
  mitigations restore accuracy; passkey capacity grows with the state size;
- ``length_generalisation``: copy and reverse beyond the training length, recurrent layers vs a
  Transformer (Universal Transformers);
- ``smoke``: one tiny cell per claim type, seconds on CPU (CI).
"""

from __future__ import annotations

from .specs import CellSpec

STATE_TRACKING_MODELS = ("lstm", "gru", "slstm", "paragru", "linear_attention", "mamba2", "s4d")
JRT_MODELS = ("gru", "linear_attention", "mamba2", "jrt")
LENGTH_MODELS = ("lstm", "gru", "linear_attention", "mamba2", "transformer")
PASSKEY_STATE_SIZES = (4, 16, 64)
#: training-free mitigations of state collapse (mamba2 options applied at test time only):
#: forget more, remember less, and a sliding window shorter than the training length
PASSKEY_MITIGATIONS = ("decay_scale=2", "insert_scale=0.5", "window=64")
PASSKEY_TRAIN, PASSKEY_TESTS = 96, (96, 192, 384, 768)


def _grid(tasks, models, train_length, test_lengths, seed):
    return [CellSpec(t, m, train_length, tuple(test_lengths), seed) for t in tasks for m in models]


def suite_cells(name: str, seed: int = 0) -> list[CellSpec]:
    """The cells of suite ``name``."""
    if name == "state_tracking":
        return (_grid(["parity"], STATE_TRACKING_MODELS, 16, (8, 16, 32, 64, 128), seed)
                + _grid(["s5"], STATE_TRACKING_MODELS, 16, (8, 16, 32, 64), seed))
    if name == "jrt":
        base = "set_disjointness:n_items=32:short_size=2"
        tasks = [f"{base}:order=short_first", f"{base}:order=long_first",
                 f"{base}:order=long_first:jrt_prompt=true"]
        return _grid(tasks, JRT_MODELS, 8, (4, 8, 16, 24), seed)
    if name == "stuffed_mamba":
        # capacity against state size: random needle depth (train and test)
        capacity = [f"mamba2:d_state={n}" for n in PASSKEY_STATE_SIZES] + ["gru"]
        # collapse and its fixes: the same trained d_state=16 model, needle at the end at test
        collapse = ["mamba2:d_state=16"] + [f"mamba2:d_state=16@{m}" for m in PASSKEY_MITIGATIONS]
        return (_grid(["passkey"], capacity, PASSKEY_TRAIN, PASSKEY_TESTS, seed)
                + _grid(["passkey@depth=1"], collapse, PASSKEY_TRAIN, PASSKEY_TESTS, seed))
    if name == "length_generalisation":
        return _grid(["copy", "reverse"], LENGTH_MODELS, 8, (4, 8, 12, 16, 24, 32), seed)
    if name == "smoke":
        return (_grid(["parity"], ["lstm"], 16, (16, 32), seed)
                + _grid(["set_disjointness:n_items=16:short_size=2"], ["gru"], 4, (4, 8), seed))
    if name == "default":
        return [c for s in ("state_tracking", "jrt", "length_generalisation", "stuffed_mamba")
                for c in suite_cells(s, seed)]
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
