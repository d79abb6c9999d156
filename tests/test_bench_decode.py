"""recurra bench decode's suite runner: mirrored repeats, each from the drafters' state before
the prompt, the state after the first run kept."""

from __future__ import annotations

from recurra.bench.decode import _run_suite


class Learner:
    """A stand-in drafter whose output depends on what it has seen."""

    def __init__(self):
        self.seen = 0


def test_repeats_are_mirrored_and_replay_the_state_before_the_prompt():
    calls = []

    def plain(ids):
        calls.append("greedy")
        return [1, 2, 3], None

    holder = {"drafter": Learner()}

    def learning(ids):
        calls.append("learner")
        d = holder["drafter"]
        d.seen += 1
        return [1, 2, 3] if d.seen % 2 else [9], 1.5  # a second sight would change the output

    learning.holder = holder
    methods = {"greedy (ours)": plain, "learner": learning}
    prompts = [("chat", [0]), ("code", [0])]
    rows = _run_suite("m", methods, prompts, "greedy (ours)", lambda msg: None, repeats=3)
    # prompt 0: A B, B A, A B; prompt 1 (rotated): B A, A B, B A
    assert calls == ["greedy", "learner", "learner", "greedy", "greedy", "learner",
                     "learner", "greedy", "greedy", "learner", "learner", "greedy"]
    # every repeat replayed the pre-prompt state (the same output); the state kept is the
    # one after the first run of each prompt: one prompt seen per prompt
    assert holder["drafter"].seen == 2
    learner_rows = [r for r in rows if r["method"] == "learner"]
    assert [r["identical"] for r in learner_rows] == [True, False]  # seen == 2 on prompt 1
    assert all(r["tokens"] in (3, 1) and r["seconds"] > 0 for r in rows)
    assert learner_rows[0]["tok_s"] == learner_rows[0]["tokens"] / learner_rows[0]["seconds"]


def test_recurrent_mode_verifies_through_the_chosen_adapter(tmp_path):
    """--recurrent-mode: the drafters verify through RecurrentAdapter(model, mode), greedy runs
    the model's own step, and every method's output equals greedy's on a tiny LSTM."""
    import argparse

    import torch

    from recurra.bench.decode import _recurrent_methods
    from recurra.decode.recurrent_adapter import RecurrentAdapter
    from recurra.models.recurrent_lm import RecurrentLM
    from recurra.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = RecurrentLM(vocab_size=256, d_model=16, n_layers=1, layer="lstm")
    save_checkpoint(tmp_path, model, {"model": model.config_dict()}, step=0)
    for mode in ("levels", "unroll", "auto"):
        args = argparse.Namespace(recurrent_checkpoint=str(tmp_path), max_new_tokens=12,
                                  cost="table", kinds="code", prompts_per_kind=1,
                                  warmup_tokens=4, recurrent_mode=mode)
        methods, prompts = _recurrent_methods(args, lambda msg: None)
        drafter_methods = [m for m in methods.values() if m.holder["drafter"] is not None]
        assert len(drafter_methods) == 3
        ids = prompts[0][1]
        ref = methods["greedy (ours)"](ids)[0]
        for name, fn in methods.items():
            assert fn(ids)[0] == ref, name
        for fn in drafter_methods:  # they verify through the adapter of the chosen mode
            assert isinstance(fn.adapter, RecurrentAdapter) and fn.adapter.exact
            assert fn.adapter.mode == ("unroll" if mode == "auto" else mode)
        assert methods["greedy (ours)"].adapter.__class__ is RecurrentLM
