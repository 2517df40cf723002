"""One bench cell = one method trained on one label subset with one seed, then evaluated.

Every cell ends in a fine-tuning run directory scored by ``orthodiff.evaluation.run_evaluation``,
so orthodiff and the baselines are measured by the same code. A cell whose row is already in
results.json is skipped; a run directory that finished but was never evaluated is evaluated only.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ...config import ExperimentConfig
from ..presets import BASELINE_METHODS, BenchPreset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    joint: str
    scenario: str  # "in-domain", or a robustness scenario name
    task: str  # classify | segment
    method: str
    fraction: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.joint}/{self.scenario}/{self.task}/{self.method}/{self.fraction:g}/seed{self.seed}"

    @property
    def run_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.task}-{self.method}-{self.fraction:g}-seed{self.seed}")


@dataclass
class CellInputs:
    """What a cell trains on: the joint's config, this seed's splits, denoisers and feature store."""

    config: ExperimentConfig
    splits: Path
    pretrained: Path | None  # <dir>/denoisers/<plane>; None when no pretrained method runs
    features: Path  # feature store folder for this seed (probe)
    runs: Path  # parent of the cells' run directories


def cell_config(cell: Cell, inputs: CellInputs, preset: BenchPreset) -> ExperimentConfig:
    """The fine-tuning config of an orthodiff or scratch-UNet cell."""
    config = inputs.config
    ft = config.finetune
    common = {"task": cell.task, "labels_fraction": float(cell.fraction), "output_dir": str(inputs.runs / cell.run_name),
                  "pretrained": str(inputs.pretrained or ft.pretrained)}
    features = inputs.features
    if cell.method == "orthodiff-probe":
        ft = replace(ft, mode=preset.probe_mode, init="pretrained", **common)
    elif cell.method == "orthodiff-probe-random-init":
        # the same probe on randomly initialised denoisers (seeded per cell seed): its own feature store
        ft = replace(ft, mode=preset.probe_mode, init="scratch", **common)
        features = inputs.features.parent.with_name(inputs.features.parent.name + "-random-init") / inputs.features.name
    elif cell.method == "orthodiff-finetune":
        ft = replace(ft, mode="partial", init="pretrained", **common)
    elif cell.method == "orthodiff-pixel":
        # frozen pretrained denoisers; blocks x timesteps chosen on validation (finetune.pixel_grid)
        ft = replace(ft, mode="probe", segmenter="pixel", init="pretrained", **common)
    elif cell.method == "scratch-unet":
        # trained from random weights: the encoder learns at the head's rate, not the fine-tuning fraction of it
        ft = replace(ft, mode="partial", init="scratch", encoder_lr_scale=1.0, **common)
    else:
        ft = replace(ft, **common)
    if cell.task == "segment":
        base_epochs = preset.segment_epochs
        if preset.segment_learning_rate:
            ft = replace(ft, learning_rate=float(preset.segment_learning_rate))
        ft = replace(ft, **preset.segment_finetune)
    elif cell.method.startswith("orthodiff-probe") and preset.probe_epochs:
        base_epochs = preset.probe_epochs
    else:
        base_epochs = ft.epochs
    ft = replace(ft, epochs=cell_epochs(preset, inputs.splits, cell.fraction, int(base_epochs), int(ft.batch_size)))
    return replace(
        config,
        seed=int(cell.seed),
        data=replace(config.data, splits=str(inputs.splits)),
        features=replace(config.features, output_dir=str(features)),
        finetune=ft,
    )


def cell_epochs(preset: BenchPreset, splits: Path, fraction: float, epochs: int, batch_size: int) -> int:
    """``epochs``, raised so that the fraction's subset gets at least ``preset.min_steps`` optimizer steps."""
    import math

    from ...data.splits import load_splits

    if not preset.min_steps:
        return int(epochs)
    patients = len(load_splits(splits).subset(float(fraction)))
    batches = max(1, math.ceil(patients / max(1, batch_size)))  # about one study per patient
    return max(int(epochs), math.ceil(preset.min_steps / batches))


def run_cell(cell: Cell, inputs: CellInputs, preset: BenchPreset) -> dict:
    """Train (unless its run directory is complete), evaluate, and return the cell's results row."""
    from ...evaluation.report import run_evaluation

    config = cell_config(cell, inputs, preset)
    run_dir = Path(config.finetune.output_dir)
    start = time.perf_counter()
    if not (run_dir / "run.json").exists():
        log.info("cell %s: training", cell.key)
        if cell.task == "segment" and cell.method == "dynunet":
            from .baselines_train import train_segmentation_baseline

            train_segmentation_baseline(config, cell.method, run_dir, preset.baseline_options(cell.method))
        elif cell.method in BASELINE_METHODS:
            from .baselines_train import train_baseline

            epochs = cell_epochs(preset, inputs.splits, cell.fraction, preset.baseline_epochs,
                                 preset.baseline_batch_size)
            train_baseline(config, cell.method, run_dir, preset.baseline_options(cell.method), epochs=epochs,
                           learning_rate=preset.baseline_learning_rate, batch_size=preset.baseline_batch_size)
        else:
            from ...finetune.run import run_finetune

            run_finetune(config)
    trained = time.perf_counter() - start
    evaluation = run_evaluation(run_dir, run_dir / "eval", n_bootstrap=int(preset.n_bootstrap))
    row = results_row(cell, run_dir, evaluation.metrics, seconds=trained)
    row.update(training_record(run_dir))
    return row


def training_record(run_dir: Path) -> dict:
    """What the run trained on and how: patients per split, optimizer steps, and the loss curve from
    metrics.jsonl ([step or epoch, training loss] per logged point), for the report's convergence."""
    import json

    from ...fileio import read_json

    info = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    curve, validation, steps = [], [], info.get("steps")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        x = entry.get("step", entry.get("epoch", number))
        if entry.get("train_loss") is not None:
            curve.append([x, float(entry["train_loss"])])
        score = next((entry[k] for k in ("val_macro_auroc", "val_mean_dice", "val_dice") if entry.get(k) is not None),
                     None)
        if score is not None:
            validation.append([x, float(score)])
        if entry.get("step") is not None:
            steps = max(int(entry["step"]), int(steps or 0))
    return {"steps": steps, "loss_curve": curve, "val_curve": validation, "patients": info.get("patients", {})}


def results_row(cell: Cell, run_dir: Path, metrics: dict, seconds: float) -> dict:
    """One results.json row: the cell's coordinates and its headline metrics with 95% intervals."""
    row = {"key": cell.key, "joint": cell.joint, "scenario": cell.scenario, "task": cell.task, "method": cell.method,
           "fraction": float(cell.fraction), "seed": int(cell.seed), "run_dir": str(run_dir),
           "train_seconds": round(float(seconds), 1), "split": metrics.get("split")}
    if cell.task == "classify":
        section = metrics["classification"]
        row["macro_auroc"] = _estimate(section["overall"]["macro"]["auroc"])
        row["auroc"] = {label: _estimate(m["auroc"]) for label, m in section["overall"]["labels"].items()}
        row["n_test_patients"] = section["overall"]["n_patients"]
        for stratum in ("by_site", "by_field_strength"):
            row[stratum] = {name: _estimate(group["macro"]["auroc"]) for name, group in section[stratum].items()}
    else:
        section = metrics["segmentation"]
        row["mean_dice"] = _estimate(section["overall"]["mean"]["dice"])
        if "thin_mean" in section["overall"]:
            row["thin_mean_dice"] = _estimate(section["overall"]["thin_mean"]["dice"])
        row["dice"] = {name: _estimate(m["dice"]) for name, m in section["overall"]["structures"].items()}
        row["n_test_patients"] = section["overall"]["n_patients"]
        for stratum in ("by_site", "by_field_strength"):
            row[stratum] = {name: _estimate(group["mean"]["dice"]) for name, group in section[stratum].items()}
    return row


def _estimate(entry: dict) -> dict:
    """{value, ci_low, ci_high} (None where undefined, with the reason)."""
    out = {"value": entry.get("value"), "ci_low": entry.get("ci_low"), "ci_high": entry.get("ci_high")}
    if entry.get("value") is None and entry.get("reason"):
        out["reason"] = entry["reason"]
    return out
