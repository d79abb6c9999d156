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
