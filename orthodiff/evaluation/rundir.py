"""Reading a fine-tuning run directory (the "Fine-tuning run directory" contract) and checking it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import OrthodiffError

PREDICTIONS = "predictions.csv"
SEGMENTATIONS = "segmentations/index.csv"
SPLITS = ("val", "test")
_CLASSIFY_COLUMNS = ("study_id", "patient_id", "split")
_SEGMENT_COLUMNS = ("series_id", "study_id", "patient_id", "split", "plane", "pred", "target", "spacing")


@dataclass
class RunInputs:
    """What a run directory holds for evaluation: its run.json and the predictions of its task."""

    run_dir: Path
    task: str
    info: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    predictions: pd.DataFrame | None = None  # classify: one row per study
    segmentations: pd.DataFrame | None = None  # segment: one row per series

    @property
    def seed(self) -> int:
        """The run's seed: run.json "seed", else config.yaml's top-level seed, else 0."""
        if self.info.get("seed") is not None:
            return int(self.info["seed"])
        config = self.run_dir / "config.yaml"
        if config.exists():
            from omegaconf import OmegaConf
            from omegaconf.errors import OmegaConfBaseException
            from yaml import YAMLError

            try:
                return int(OmegaConf.load(config).get("seed", 0) or 0)
            except (OmegaConfBaseException, YAMLError, TypeError, ValueError):
                return 0  # an unreadable config only loses the seed; evaluation goes on with 0
        return 0


def read_run(run_dir: str | Path) -> RunInputs:
    """Load and check a run directory; one clear OrthodiffError line for anything missing or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OrthodiffError(f"{run_dir}: run directory not found; give a folder written by `orthodiff finetune`")
    info = _read_info(run_dir)
    task = info.get("task") or _guess_task(run_dir)
    if task == "classify":
        predictions = _read_predictions(run_dir / PREDICTIONS, info.get("labels"))
        labels = info.get("labels") or [c[len("prob_"):] for c in predictions.columns if c.startswith("prob_")]
        return RunInputs(run_dir, task, info, list(labels), list(info.get("classes") or []), predictions=predictions)
    if task == "segment":
        segmentations = _read_segmentations(run_dir, run_dir / SEGMENTATIONS)
        return RunInputs(run_dir, task, info, list(info.get("labels") or []), list(info.get("classes") or []),
                         segmentations=segmentations)
    raise OrthodiffError(f"{run_dir / 'run.json'}: task={task!r} is not classify or segment")


def _read_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OrthodiffError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(info, dict):
        raise OrthodiffError(f"{path}: expected a JSON object with task, labels, classes")
    return info


def _guess_task(run_dir: Path) -> str:
    if (run_dir / PREDICTIONS).exists():
        return "classify"
    if (run_dir / SEGMENTATIONS).exists():
        return "segment"
    raise OrthodiffError(f"{run_dir / PREDICTIONS}: predictions file not found (nor {SEGMENTATIONS}); "
                         "run `orthodiff finetune` into this folder first")


def _read_csv(path: Path, required: tuple) -> pd.DataFrame:
    if not path.exists():
        raise OrthodiffError(f"{path}: predictions file not found; run `orthodiff finetune` into this folder first")
    frame = pd.read_csv(path, dtype={"study_id": str, "patient_id": str, "series_id": str, "site": str})
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise OrthodiffError(f"{path}: missing column(s) {', '.join(missing)}; see the run directory contract")
    frame = _normalise_strata(frame)
    frame["split"] = frame["split"].astype(str)
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise OrthodiffError(f"{path}: split values {unknown} are not val or test")
    return frame


def _read_predictions(path: Path, labels: list | None) -> pd.DataFrame:
    frame = _read_csv(path, _CLASSIFY_COLUMNS)
    if frame.empty:
        raise OrthodiffError(f"{path}: no rows; the run wrote no predictions")
    labels = labels or [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    if not labels:
        raise OrthodiffError(f"{path}: no prob_<label> columns; nothing to evaluate")
    for label in labels:
        for column in (f"prob_{label}", f"label_{label}"):
            if column not in frame.columns:
                raise OrthodiffError(f"{path}: column {column} missing for label {label!r} named in run.json")
        probs = pd.to_numeric(frame[f"prob_{label}"], errors="coerce")
        if probs.isna().any() or ((probs < 0) | (probs > 1)).any():
            raise OrthodiffError(f"{path}: prob_{label} must be probabilities in [0, 1] on every row")
        targets = pd.to_numeric(frame[f"label_{label}"], errors="coerce")
        if not targets.dropna().isin([0, 1]).all():
            raise OrthodiffError(f"{path}: label_{label} must be 0, 1 or empty (unknown)")
        frame[f"prob_{label}"], frame[f"label_{label}"] = probs.astype(float), targets.astype(float)
    return frame


def _read_segmentations(run_dir: Path, path: Path) -> pd.DataFrame:
    frame = _read_csv(path, _SEGMENT_COLUMNS)
    for column in ("pred", "target"):
        frame[column] = [str(p) if Path(str(p)).is_absolute() else str(run_dir / str(p)) for p in frame[column]]
    try:
        frame["spacing"] = [tuple(float(s) for s in json.loads(v)) for v in frame["spacing"]]
    except (TypeError, ValueError) as exc:
        raise OrthodiffError(f"{path}: spacing must be a JSON list [d, h, w] in mm on every row") from exc
    if any(len(s) != 3 for s in frame["spacing"]):
        raise OrthodiffError(f"{path}: spacing must be a JSON list of three numbers [d, h, w]")
    return frame


def _normalise_strata(frame: pd.DataFrame) -> pd.DataFrame:
    """Site and field strength as readable group names; unknown values become "unknown"."""
    frame = frame.copy()
    site = frame["site"] if "site" in frame.columns else pd.Series([""] * len(frame), index=frame.index)
    frame["site"] = [s if isinstance(s, str) and s.strip() else "unknown" for s in site]
    strength = frame["field_strength"] if "field_strength" in frame.columns else pd.Series([np.nan] * len(frame))
    frame["field_strength"] = [_field_strength_name(v) for v in strength]
    return frame


def _field_strength_name(value) -> str:
    try:
        tesla = float(value)
    except (TypeError, ValueError):
        return "unknown"
    return f"{tesla:g}T" if np.isfinite(tesla) else "unknown"
