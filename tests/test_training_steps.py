"""The shared best-validation loop: exact step budgets, validation every eval_every steps, patience,
the epoch budget it keeps when max_steps is unset, and the loss curve it writes."""

import json

import pytest

from orthodiff.errors import OrthodiffError
from orthodiff.finetune.scoring import MetricsLog
from orthodiff.finetune.steps import StepBudget, run_summary, train_best


def _train(tmp_path, budget, scores=None, batches=(1, 2, 3), skip=()):
    """train_best on fake batches; ``scores`` are the successive validation values."""
    calls = {"steps": 0, "validations": 0}
    scores = list(scores or [])

    def step(batch):
        if batch in skip:
            return None
        calls["steps"] += 1
        return 1.0 / calls["steps"]

    def validate():
        calls["validations"] += 1
        return scores[calls["validations"] - 1] if scores else 0.5

    log = MetricsLog(tmp_path / "metrics.jsonl")
    summary = train_best(budget, list(batches), step, validate, lambda: {"at": calls["steps"]}, log, "val_score")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, calls


def test_step_budget_is_exact_and_cycles_the_loader(tmp_path):
    summary, rows, calls = _train(tmp_path, StepBudget(max_steps=7, eval_every=3), scores=[0.1, 0.3, 0.2])
    assert calls["steps"] == summary["steps"] == 7  # three batches a pass: the loader was cycled
    assert [r["step"] for r in rows] == [3, 6, 7]  # every eval_every steps and after the last one
    assert all(r["train_loss"] is not None and "val_score" in r for r in rows)
    assert summary["best_step"] == 6 and summary["state"] == {"at": 6} and summary["val_score"] == 0.3
    assert summary["stopped_early"] is False
    assert run_summary(summary) == {"best_epoch": 1, "best_step": 6, "steps": 7, "stopped_early": False}


def test_patience_stops_after_validations_without_improvement(tmp_path):
    budget = StepBudget(max_steps=100, eval_every=2, patience=2)
    summary, rows, _ = _train(tmp_path, budget, scores=[0.4, 0.6, 0.6, 0.5, 0.9])
    assert summary["stopped_early"] is True
    assert summary["steps"] == 8 and len(rows) == 4  # stopped at the second stale validation
    assert summary["best_step"] == 4 and summary["val_score"] == 0.6  # a tie is no improvement


def test_without_max_steps_the_budget_stays_in_epochs(tmp_path):
    summary, rows, calls = _train(tmp_path, StepBudget(epochs=3), scores=[0.2, 0.1, 0.15])
    assert calls["steps"] == summary["steps"] == 9 and summary["epochs"] == 3
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 3), (1, 6), (2, 9)]  # once a pass
    assert summary["best_epoch"] == 0 and summary["best_step"] == 3


def test_skipped_batches_are_not_steps_and_an_unlearnable_set_is_an_error(tmp_path):
    summary, _, _ = _train(tmp_path, StepBudget(max_steps=4), batches=(1, 2, 3), skip=(2,))
    assert summary["steps"] == 4
    with pytest.raises(OrthodiffError, match="anything to learn"):
        _train(tmp_path, StepBudget(max_steps=4), batches=(1, 2), skip=(1, 2))


def test_undefined_validation_keeps_the_latest_weights(tmp_path):
    summary, _, _ = _train(tmp_path, StepBudget(epochs=2), scores=[None, None])
    assert summary["best_step"] == 6 and summary["val_score"] is None


@pytest.mark.parametrize(
    "budget, message",
    [(StepBudget(max_steps=0), "max_steps"), (StepBudget(epochs=0), "epochs"),
     (StepBudget(max_steps=5, eval_every=-1), "eval_every"), (StepBudget(max_steps=5, patience=0), "patience")],
)
def test_bad_budgets_name_the_field(budget, message):
    with pytest.raises(OrthodiffError, match=message):
        budget.check()
