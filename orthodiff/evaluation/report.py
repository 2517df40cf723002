"""`orthodiff evaluate RUN`: metrics with patient-bootstrap intervals, overall and by site and field
strength, written as metrics.json, metrics.md and PNG plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import OrthodiffError
from ..fileio import write_text
from . import plots
from .bootstrap import CONFIDENCE
from .classification import DEFAULT_THRESHOLD, N_BINS, choose_thresholds, classification_metrics
from .rundir import RunInputs, read_run
from .segmentation import segmentation_metrics, series_scores, structure_names
from .stratify import stratified
from .tables import cell, classification_tables, segmentation_tables

FORMAT = "orthodiff-evaluation"
AGGREGATION = ("patient level: a patient's probability is the mean of its studies' probabilities; "
               "it is positive when any of its studies is")


@dataclass
class EvaluationResult:
    out: Path
    task: str
    metrics: dict
    files: list = field(default_factory=list)

    def describe(self) -> str:
        m = self.metrics
        where = f"{m['split']} split"
        if self.task == "classify":
            overall = m["classification"]["overall"]
            macro = overall["macro"]
            text = (f"Evaluated {m['run']} (classify, {where}: {overall['n_patients']} patients, "
                    f"{overall['n_studies']} studies): macro AUROC {cell(macro['auroc'])}, "
                    f"macro AP {cell(macro['ap'])}, mean ECE {cell(macro['ece'])}")
            excluded = macro["auroc"]["labels_excluded"]
            if excluded:
                text += "; left out of the macro: " + ", ".join(f"{k} ({v})" for k, v in excluded.items())
        else:
            overall = m["segmentation"]["overall"]
            text = (f"Evaluated {m['run']} (segment, {where}: {overall['n_patients']} patients, "
                    f"{overall['n_series']} series): mean Dice {cell(overall['mean']['dice'])}, "
                    f"mean HD95 {cell(overall['mean']['hd95_mm'], 2)} mm")
            if m["skipped"]:
                text += f"; {len(m['skipped'])} series skipped (listed in metrics.json)"
        return (text + f". 95% intervals from {m['n_bootstrap']} patient bootstrap resamples; wrote "
                + ", ".join(p.name for p in self.files) + f" to {self.out}.")


def run_evaluation(run_dir, out=None, *, n_bootstrap: int = 1000, seed: int | None = None) -> EvaluationResult:
    """Evaluate a fine-tuning run directory; writes OUT (default RUN/eval)/metrics.json, metrics.md, PNGs."""
    if n_bootstrap < 1:
        raise OrthodiffError(f"n_bootstrap={n_bootstrap}: give at least 1 resample (1000 is usual)")
    inputs = read_run(run_dir)
    out = Path(out) if out is not None else inputs.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    seed = inputs.seed if seed is None else int(seed)
    header = {"format": FORMAT, "version": 1, "run": str(inputs.run_dir), "task": inputs.task,
              "n_bootstrap": int(n_bootstrap), "confidence": CONFIDENCE, "seed": seed}
    if inputs.task == "classify":
        metrics, markdown, files = _evaluate_classification(inputs, out, header, n_bootstrap, seed)
    else:
        metrics, markdown, files = _evaluate_segmentation(inputs, out, header, n_bootstrap, seed)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text(out / "metrics.md", markdown)
    files = [out / "metrics.json", out / "metrics.md"] + files
    return EvaluationResult(out=out, task=inputs.task, metrics=metrics, files=files)


def _evaluated_split(frame: pd.DataFrame, notes: list) -> tuple[str, pd.DataFrame]:
    """The test split; the validation split (with a note) when the run has no test rows."""
    if (frame["split"] == "test").any():
        return "test", frame[frame["split"] == "test"]
    notes.append("no test rows: metrics are on the validation split")
    return "val", frame[frame["split"] == "val"]


def _evaluate_classification(inputs: RunInputs, out: Path, header: dict, n_bootstrap: int, seed: int):
    frame, labels, notes = inputs.predictions, inputs.labels, []
    split, evaluated = _evaluated_split(frame, notes)
    val = frame[frame["split"] == "val"]
    if len(val):
        thresholds = choose_thresholds(val, labels)
    else:
        thresholds = {label: {"value": DEFAULT_THRESHOLD, "source": "default",
                              "reason": f"no validation rows; used {DEFAULT_THRESHOLD}"} for label in labels}
    if split == "val":
        notes.append("thresholds were chosen on the same split they are applied to (optimistic)")
    metrics = stratified(evaluated, lambda group: classification_metrics(group, labels, thresholds, n_bootstrap, seed))
    files = [
        plots.roc_curves(evaluated, labels, metrics["overall"], out / "roc.png"),
        plots.reliability_diagram(evaluated, labels, out / "reliability.png"),
    ]
    document = {**header, "split": split, "threshold_split": "val", "aggregation": AGGREGATION,
                "calibration_bins": N_BINS, "labels": labels, "thresholds": thresholds,
                "classification": metrics, "notes": notes, "plots": [p.name for p in files]}
    markdown = _markdown(inputs, document, classification_tables(metrics, labels, thresholds), files)
    return document, markdown, files


def _evaluate_segmentation(inputs: RunInputs, out: Path, header: dict, n_bootstrap: int, seed: int):
    structures = structure_names(inputs.classes, inputs.segmentations)
    scores, skipped = series_scores(inputs.segmentations, structures)
    if scores.empty:
        first = skipped[0]["reason"] if skipped else "the index has no rows"
        raise OrthodiffError(f"{inputs.run_dir / 'segmentations/index.csv'}: no readable series ({first})")
    notes = []
    split, evaluated = _evaluated_split(scores, notes)

    def compute(group: pd.DataFrame) -> dict:
        return segmentation_metrics(group, structures, n_bootstrap, seed)

    metrics = stratified(evaluated, compute)
    metrics["by_plane"] = {str(plane): compute(group) for plane, group in evaluated.groupby("plane", sort=True)}
    files = [plots.dice_per_structure(metrics["overall"], out / "dice.png")]
    document = {**header, "split": split, "structures": structures,
                "aggregation": "patient level: a patient's value is the mean over its series",
                "segmentation": metrics, "skipped": skipped, "notes": notes, "plots": [p.name for p in files]}
    markdown = _markdown(inputs, document, segmentation_tables(metrics, structures), files)
    if skipped:
        markdown += "\n### Skipped series\n\n" + "\n".join(f"- {s['series_id']}: {s['reason']}" for s in skipped) + "\n"
    return document, markdown, files


def _markdown(inputs: RunInputs, document: dict, tables: str, files: list) -> str:
    lines = [f"# Evaluation of {inputs.run_dir.name}", "",
             (f"Task: {document['task']}. Split: {document['split']}. {document['aggregation'].capitalize()}. "
              f"Intervals: {int(document['confidence'] * 100)}% percentile bootstrap over patients, "
              f"{document['n_bootstrap']} resamples, seed {document['seed']}.")]
    if document["task"] == "classify":
        lines.append("Sensitivity and specificity use per-label thresholds chosen on the validation split "
                     f"(Youden's J); calibration error uses {N_BINS} equal-width bins.")
    lines += [f"Note: {note}." for note in document["notes"]]
    lines += ["", tables, "", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in files]
    return "\n".join(lines) + "\n"
