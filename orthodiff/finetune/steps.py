"""The best-validation training loop every trained model shares (heads, end-to-end fine-tuning,
segmentation decoders, supervised baselines), so every method can get the same optimizer-step budget.

Two budgets: ``epochs`` passes over the training loader (``max_steps`` unset, the default), or
exactly ``max_steps`` optimizer steps, cycling the loader. Validation runs every ``eval_every`` steps
(0: at the end of every pass) and after the last step; the best validated weights are kept; with
``patience``, training stops after that many validations in a row without improvement. Each
validation writes one ``metrics.jsonl`` row: epoch, step, mean training loss since the previous
validation, the validation metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import OrthodiffError


@dataclass(frozen=True)
class StepBudget:
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 0
    patience: int | None = None

    @classmethod
    def from_finetune(cls, ft, epochs: int | None = None) -> StepBudget:
        """The budget ``finetune`` asks for (``epochs`` overrides ``finetune.epochs``)."""
        budget = cls(
            epochs=int(ft.epochs if epochs is None else epochs),
            max_steps=None if ft.max_steps is None else int(ft.max_steps),
            eval_every=int(ft.eval_every or 0),
            patience=None if ft.patience is None else int(ft.patience),
        )
        budget.check()
        return budget

    def check(self) -> None:
        if self.max_steps is None and self.epochs < 1:
            raise OrthodiffError(f"finetune.epochs={self.epochs}: must be at least 1 (or set finetune.max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise OrthodiffError(f"finetune.max_steps={self.max_steps}: must be at least 1, or null for epochs")
        if self.eval_every < 0:
            raise OrthodiffError(f"finetune.eval_every={self.eval_every}: must be 0 (every epoch) or a step count")
        if self.patience is not None and self.patience < 1:
            raise OrthodiffError(f"finetune.patience={self.patience}: must be at least 1, or null to never stop early")

    @property
    def by_steps(self) -> bool:
        return self.max_steps is not None


def train_best(
    budget: StepBudget,
    loader: Iterable,
    step: Callable[[object], float | None],
    validate: Callable[[], float | None],
    snapshot: Callable[[], dict],
    log,
    metric: str,
) -> dict:
    """Run ``budget``; ``step(batch)`` makes one optimizer step and gives its loss (None: the batch
    had nothing to learn from, no step taken); ``validate()`` gives the validation score (higher is
    better; None when undefined); ``snapshot()`` copies the weights.

    Returns {"state", "steps", "epochs", "best_step", "best_epoch", "stopped_early", metric}: the best
    validated weights (the latest ones when no validation was ever defined).
    """
    budget.check()
    best = {"value": None, "state": None, "step": 0, "epoch": -1}
    state = {"steps": 0, "epoch": 0, "losses": [], "stale": 0, "stop": False}

    def evaluate() -> None:
        value = validate()
        improved = value is not None and (best["value"] is None or value > best["value"])
        if improved or best["value"] is None:  # undefined so far: keep the latest weights
            best.update(value=value, state=snapshot(), step=state["steps"], epoch=state["epoch"])
        state["stale"] = 0 if improved else state["stale"] + 1
        losses = state["losses"]
        log.write(epoch=state["epoch"], step=state["steps"], train_loss=float(np.mean(losses)) if losses else None,
                  **{metric: value})
        state["losses"] = []
        if budget.patience is not None and value is not None and state["stale"] >= budget.patience:
            state["stop"] = True

    while not state["stop"]:
        if not budget.by_steps and state["epoch"] >= budget.epochs:
            break
        stepped = False
        for batch in loader:
            loss = step(batch)
            if loss is None:
                continue
            stepped = True
            state["steps"] += 1
            state["losses"].append(float(loss))
            last = budget.by_steps and state["steps"] >= budget.max_steps
            if last or (budget.eval_every and state["steps"] % budget.eval_every == 0):
                evaluate()
            if last or state["stop"]:
                break
        if not stepped and not state["stop"]:
            raise OrthodiffError("training: no batch of the training set has anything to learn from "
                                 "(no labels or segmentations in the training subset)")
        reached = budget.by_steps and state["steps"] >= budget.max_steps
        if not state["stop"] and not reached and not budget.eval_every:
            evaluate()  # end of a pass
        elif not state["stop"] and not budget.by_steps and budget.eval_every and state["epoch"] + 1 >= budget.epochs \
                and state["losses"]:
            evaluate()  # the last pass ended between two validations
        state["epoch"] += 1
        if reached:
            break
    return {
        "state": best["state"],
        "steps": state["steps"],
        "epochs": state["epoch"],
        "best_step": best["step"],
        "best_epoch": best["epoch"],
        "stopped_early": bool(state["stop"]),
        metric: best["value"],
    }


def run_summary(summary: dict) -> dict:
    """The run.json fields of a training summary."""
    return {key: summary[key] for key in ("best_epoch", "best_step", "steps", "stopped_early")}


class SilentLog:
    """A metrics log that writes nothing: what the processes other than the main one log to."""

    def write(self, **record) -> None:
        pass
