"""The evaluation runner: metrics against hand counts, resume, failure isolation, output files,
and a real smoke training run (an LSTM must solve parity at length 16)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from recurra.evaluation.metrics import masked_accuracies
from recurra.evaluation.report import write_report
from recurra.evaluation.runner import cell_path, run_cells
from recurra.evaluation.specs import BUDGETS, CellSpec, parse_model_spec
from recurra.evaluation.suites import SUITES, grid_cells, suite_cells


def test_metrics_against_hand_counts():
    targets = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    preds = targets.clone()
    preds[0, 2] = 9       # row 0: one of its 2 answers wrong (the last one)
    preds[1, 0] = 9       # row 1: first of 4 answers wrong, last right
    preds[2, 0] = 9       # outside the mask: ignored
    acc = masked_accuracies(preds, targets, mask)
    assert acc["token"] == pytest.approx(5 / 7)
    assert acc["sequence"] == pytest.approx(1 / 3)
    assert acc["last"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="answer position"):
        masked_accuracies(preds, targets, torch.zeros_like(mask))


def test_model_spec_parsing():
    s = parse_model_spec("mamba2:d_state=16:n_layers=1@clip=true")
    assert s.layer == "mamba2" and s.layer_options == {"d_state": 16}
    assert s.model_options == {"n_layers": 1} and s.test_layer_options == {"clip": True}
    assert parse_model_spec("transformer:n_heads=2").architecture == "transformer"
    with pytest.raises(ValueError, match="transformer"):
        parse_model_spec("transformer:d_state=3")
    with pytest.raises(ValueError, match="test-time"):
        parse_model_spec("gru@d_model=8")


def test_suites_are_well_formed():
    for name in SUITES:
        for budget in ("smoke", "small", "full"):
            cells = suite_cells(name, budget=budget)
            assert cells and len({c.cell_id() for c in cells}) == len(cells)
    small = {c.cell_id(): c for c in suite_cells("default", budget="small")}
    full = {c.cell_id(): c for c in suite_cells("default", budget="full")}
    assert set(small) == set(full)  # the same cells, sized differently
    s5 = next(c for c in small.values() if c.task.startswith("s5"))
    assert dict(s5.overrides)["steps"] == 4000 and dict(full[s5.cell_id()].overrides)["steps"] == 8000
    with pytest.raises(ValueError, match="unknown suite"):
        suite_cells("nope")
    cells = grid_cells(["parity", "copy"], ["lstm", "gru"])
    assert len(cells) == 4 and cells[0].train_length == 16


def test_cell_overrides_change_the_budget_and_the_configuration(tmp_path):
    budget = BUDGETS["small"]
    plain = CellSpec("parity", "lstm", 16, (16,))
    longer = CellSpec("parity", "lstm", 16, (16,), overrides=(("steps", 2000),))
    assert plain.budget(budget) is budget
    assert longer.budget(budget).steps == 2000 and longer.budget(budget).lr == budget.lr
    assert plain.config(budget) != longer.config(budget)
    assert "overrides" not in plain.config(budget)["cell"]  # old cell files keep their hash
    with pytest.raises(ValueError, match="overrides"):
        CellSpec("parity", "lstm", 16, (16,), overrides=(("d_model", 8),))
    seen = []

    def train(cell, budget, on_step=None, cache_dir=None):
        seen.append(budget.steps)
        return fake_train([])(cell, budget)

    run_cells([plain, CellSpec("copy", "gru", 4, (4,), overrides=(("steps", 7),))],
              budget, str(tmp_path), progress=False, train_fn=train)
    assert seen == [budget.steps, 7]


def test_head_is_untied_where_the_task_says_so():
    from recurra.evaluation.training import build_cell_model
    from recurra.tasks.registry import build_task

    budget = BUDGETS["smoke"]
    for spec, tied in (("s5", False), ("parity", False), ("copy", True), ("passkey", True)):
        task = build_task(spec)
        model = build_cell_model(parse_model_spec("gru"), task.vocab_size, budget,
                                 tie_weights=task.tie_weights)
        assert (model.head.weight is model.embedding.weight) == tied, spec
    model = build_cell_model(parse_model_spec("gru:tie_weights=true"), 120, budget,
                             tie_weights=False)
    assert model.head.weight is model.embedding.weight


def fake_train(calls, fail=()):
    def train(cell, budget, on_step=None, cache_dir=None):
        calls.append(cell.cell_id())
        if cell.model in fail:
            raise RuntimeError(f"{cell.model} is broken")
        acc = {"token": 0.5, "sequence": 0.25, "last": 0.75}
        return {"status": "ok", "task": cell.task, "task_name": cell.task, "model": cell.model,
                "primary_metric": "last", "train_length": cell.train_length,
                "accuracy": {str(n): acc for n in cell.test_lengths}, "train_seconds": 0.0}
    return train


def test_resume_and_failure_isolation(tmp_path):
    out = str(tmp_path)
    cells = [CellSpec("parity", m, 4, (4, 8)) for m in ("a", "bad", "c")]
    budget = BUDGETS["smoke"]
    calls: list[str] = []
    results = run_cells(cells, budget, out, progress=False, train_fn=fake_train(calls, {"bad"}))
    assert [r["status"] for r in results] == ["ok", "failed", "ok"]
    assert "bad is broken" in results[1]["error"]
    assert len(calls) == 3
    for c in cells:
        assert os.path.exists(cell_path(out, c))
    # resume: finished cells are not recomputed; the failed one is retried
    calls.clear()
    results = run_cells(cells, budget, out, progress=False, train_fn=fake_train(calls))
    assert calls == [cells[1].cell_id()]
    assert [r["status"] for r in results] == ["ok"] * 3
    # a changed configuration (budget) recomputes; --no-resume recomputes everything
    calls.clear()
    run_cells(cells[:1], replace(budget, steps=budget.steps + 1), out, progress=False,
              train_fn=fake_train(calls))
    assert calls == [cells[0].cell_id()]
    calls.clear()
    run_cells(cells, budget, out, resume=False, progress=False, train_fn=fake_train(calls))
    assert len(calls) == 3
    # a damaged cell file is recomputed, not fatal
    with open(cell_path(out, cells[2]), "w") as f:
        f.write("{not json")
    calls.clear()
    run_cells(cells, budget, out, progress=False, train_fn=fake_train(calls))
    assert calls == [cells[2].cell_id()]


def test_report_files(tmp_path):
    out = str(tmp_path)
    cells = [CellSpec("parity", m, 4, (4, 8)) for m in ("a", "bad")]
    results = run_cells(cells, BUDGETS["smoke"], out, progress=False,
                        train_fn=fake_train([], {"bad"}))
    from dataclasses import asdict

    paths = write_report(out, results, "t", "recurra eval x", asdict(BUDGETS["smoke"]))
    with open(paths["json"]) as f:
        data = json.load(f)
    assert [c["status"] for c in data["cells"]] == ["ok", "failed"]
    with open(paths["markdown"]) as f:
        md = f.read()
    assert "| `a` | 0.75 | 0.75 |" in md and "8*" in md
    assert "`bad`: RuntimeError: bad is broken" in md
    assert os.path.getsize(paths["parity"]) > 1000  # a PNG was drawn


def test_report_splits_a_task_trained_at_two_lengths(tmp_path):
    from recurra.evaluation.report import group_by_task

    cells = [CellSpec("parity", "a", 4, (4, 8)), CellSpec("parity", "a", 8, (4, 8)),
             CellSpec("copy", "a", 4, (4,))]
    results = run_cells(cells, BUDGETS["smoke"], str(tmp_path), progress=False,
                        train_fn=fake_train([]))
    assert list(group_by_task(results)) == ["parity [train 4]", "parity [train 8]", "copy"]


def test_real_cells_smoke_lstm_solves_parity_and_unknown_layer_fails(tmp_path):
    """The CI smoke check: real training; the numbers must be sane, not just present."""
    torch.set_num_threads(2)
    budget = replace(BUDGETS["smoke"], n_test=128, max_train_seconds=0)  # deterministic
    cells = [CellSpec("parity", "lstm", 16, (16,)),
             CellSpec("parity", "no_such_layer", 16, (16,))]
    results = run_cells(cells, budget, str(tmp_path), progress=False)
    ok, failed = results
    assert failed["status"] == "failed" and "no_such_layer" in failed["error"]
    assert ok["status"] == "ok", ok.get("error")
    assert ok["accuracy"]["16"]["last"] >= 0.95, ok["accuracy"]
    assert ok["final_loss"] < 0.1


def test_test_time_options_reuse_the_trained_weights(tmp_path):
    budget = replace(BUDGETS["smoke"], steps=3, n_test=8)
    cells = [CellSpec("passkey", "gru", 60, (60,)), CellSpec("passkey@depth=1", "gru", 60, (60,))]
    first, second = run_cells(cells, budget, str(tmp_path), progress=False)
    assert first["status"] == second["status"] == "ok", (first.get("error"), second.get("error"))
    assert "reused_training" not in first and second["reused_training"]
    assert first["loss_curve"] == second["loss_curve"]
    # --no-resume retrains: the weights of the earlier run are not reused
    again = run_cells(cells[:1], budget, str(tmp_path), resume=False, progress=False)[0]
    assert again["status"] == "ok" and "reused_training" not in again
    assert again["loss_curve"] == first["loss_curve"]  # and training is deterministic


def test_warm_start_trains_at_the_short_length_first(monkeypatch):
    from recurra.evaluation import training
    from recurra.tasks.passkey import PasskeyTask

    seen = []
    original = PasskeyTask.sample

    def spy(self, n, length, **kw):
        seen.append(length)
        return original(self, n, length, **kw)

    monkeypatch.setattr(PasskeyTask, "sample", spy)
    budget = replace(BUDGETS["smoke"], steps=5, batch_size=2, warm_start_steps=3,
                     warm_start_length=55)
    training.train_model(CellSpec("passkey", "gru", 60, (60,)), budget)
    assert seen == [55, 55, 55, 60, 60]


def test_cli_writes_results_and_records_a_missing_layer(tmp_path, monkeypatch):
    import argparse

    from recurra.commands import eval as eval_command
    from recurra.evaluation import specs

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())  # only this subcommand: others may be mid-edit

    def main(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    monkeypatch.setitem(specs.BUDGETS, "smoke", replace(BUDGETS["smoke"], steps=3, n_test=8))
    out = str(tmp_path / "out")
    code = main(["eval", "--tasks", "parity,copy", "--layers", "gru", "not_a_layer",
                 "--budget", "smoke", "--train-length", "4", "--test-lengths", "4", "8",
                 "--out", out])
    assert code == 0
    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    status = {(c["task"], c["model"]): c["status"] for c in data["cells"]}
    assert status == {("parity", "gru"): "ok", ("copy", "gru"): "ok",
                      ("parity", "not_a_layer"): "failed", ("copy", "not_a_layer"): "failed"}
    assert os.path.exists(os.path.join(out, "plot_parity.png"))
    assert len(os.listdir(os.path.join(out, "cells"))) == 4


def test_prefix_layers_get_the_prompt_as_prefix():
    from recurra.evaluation.prefix_lm import PrefixLM, set_prefix_length
    from recurra.tasks.registry import build_task

    torch.manual_seed(0)
    task = build_task("set_disjointness:n_items=16:short_size=2")
    model = PrefixLM(task.vocab_size, d_model=16, n_layers=1, layer="jrt",
                     layer_options={"heads": 2})
    batch = task.sample(4, 5, seed=0)
    set_prefix_length(model, batch.mask)
    assert model.mixers[0].prefix_length == task.sequence_length(5) - 1  # everything before ANS
    # the first position reads the whole prefix (non-causal), so changing a later prefix token
    # changes its output; the answer never is an input, so nothing leaks
    logits = model(batch.inputs)[0]
    changed = batch.inputs.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 16
    assert not torch.allclose(model(changed)[0][:, 0], logits[:, 0])
