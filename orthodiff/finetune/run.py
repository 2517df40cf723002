"""``orthodiff finetune classify|segment``: train heads, write the run directory evaluation reads.

RUN/config.yaml, RUN/run.json, RUN/metrics.jsonl, and RUN/predictions.csv (classify, one row per
val/test study; RUN/predictions_patient.csv aggregates per patient) or RUN/segmentations/ (segment).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import save_config
from ..errors import OrthodiffError
from ..features.selection import key_name
from ..fileio import read_json, safe_filename, write_json, write_table
from ..planes import PLANES
from .scoring import MetricsLog, auroc_scores, patient_level
from .steps import SilentLog, run_summary
from .studies import load_run_studies, resolve_labels, run_patients

TASKS = ("classify", "segment")
MODES = ("probe", "grid", "partial", "full")

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    task: str
    mode: str
    init: str
    labels_fraction: float
    metrics: dict = field(default_factory=dict)  # {split: {...}}
    choice: dict | None = None  # the grid's chosen cell
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        key = "macro_auroc" if self.task == "classify" else "mean_dice"
        scores = ", ".join(
            f"{split} {key.replace('_', ' ')} {_fmt(self.metrics.get(split, {}).get(key))}" for split in ("val", "test")
        )
        text = (
            f"{self.task} ({self.mode}, init {self.init}, {self.labels_fraction:.0%} of training labels): {scores}"
            f"; {self.seconds:.0f} s; run directory {self.run_dir}"
        )
        if self.choice:
            chosen = "; ".join(f"{plane} {'+'.join(keys)}" for plane, keys in self.choice["selection"].items())
            text += f". Grid chose per plane {chosen} (block@t), lr {self.choice['learning_rate']:g}"
        if self.warnings:
            text += f". {len(self.warnings)} warning(s) in run.json, e.g.: {self.warnings[0]}"
        return text


def run_finetune(cfg) -> FinetuneResult:
    """Train diagnosis or segmentation heads as ``cfg.finetune`` says; write ``finetune.output_dir``."""
    from ..data.cache import PlaneCache
    from ..data.selection import select_cache
    from ..data.splits import load_splits

    ft = cfg.finetune
    if ft.task not in TASKS:
        raise OrthodiffError(f"finetune.task={ft.task!r}: use classify or segment")
    if ft.mode not in MODES:
        raise OrthodiffError(f"finetune.mode={ft.mode!r}: use one of {', '.join(MODES)}")
    if ft.task == "segment" and ft.mode == "grid":
        raise OrthodiffError("finetune.mode=grid is for classify; segment with probe, partial or full")
    if int(ft.epochs) < 1:
        raise OrthodiffError(f"finetune.epochs={ft.epochs}: must be at least 1")
    if ft.task == "segment" and ft.segmenter not in ("decoder", "pixel"):
        raise OrthodiffError(f"finetune.segmenter={ft.segmenter!r}: use decoder or pixel")
    start = time.perf_counter()
    _seed_everything(int(cfg.seed))
    out = Path(ft.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = select_cache(PlaneCache(cfg.data.cache), cfg.data.series)
    cache.check_plane_size(cfg.data.plane_size)
    cache.check_field_of_view(cfg.data.field_of_view_mm)  # the run's config, which a pipeline predicts by
    splits = load_splits(cfg.data.splits)
    cache.check_splits(splits)
    patients = run_patients(splits, ft.labels_fraction)
    main = _is_main_process()
    if main:
        save_config(cfg, out / "config.yaml")
    metrics_log = MetricsLog(out / "metrics.jsonl") if main else SilentLog()
    info = {
        "task": ft.task,
        "labels": [],
        "classes": [],
        "cache": str(Path(cfg.data.cache).resolve()),
        "splits": str(Path(cfg.data.splits).resolve()),
        "labels_fraction": float(ft.labels_fraction),
        "init": ft.init,
        "mode": ft.mode,
        "seed": int(cfg.seed),
        "pretrained": str(Path(ft.pretrained).resolve()) if ft.init == "pretrained" else None,
        "pooling": ft.pooling,
        "readout_grid": [int(v) for v in ft.readout_grid],
        "fusion": ft.fusion,
        "use_ehr": bool(ft.use_ehr),
        # Probes read cached features of unaugmented tensors: augmentation cannot apply to them.
        "augment": bool(ft.augment) and not (ft.task == "classify" and ft.mode in ("probe", "grid")),
        "patients": {split: len(ids) for split, ids in patients.items()},
        "aggregation": "patient: mean of study probabilities; a patient is positive when any study is",
    }
    if ft.task == "classify":
        info, metrics, warnings = _classify(cfg, cache, patients, info, out, metrics_log)
    else:
        info, metrics, warnings = _segment(cfg, cache, patients, info, out, metrics_log)
    for warning in warnings:
        log.info(warning)
    info.update(metrics=metrics, warnings=warnings, seconds=round(time.perf_counter() - start, 2))
    if main:
        write_json(out / "run.json", info)
    _wait_for_everyone()  # the run directory is complete on return, on every process
    return FinetuneResult(
        run_dir=out, task=ft.task, mode=ft.mode, init=ft.init, labels_fraction=float(ft.labels_fraction),
        metrics=metrics, choice=(info.get("grid") or {}).get("best"), warnings=warnings, seconds=info["seconds"],
    )


# ------------------------------------------------------------------------------- classify
def _classify(cfg, cache, patients, info, out: Path, metrics_log):
    import torch

    from ..heads import MultiLabelClassifier

    ft = cfg.finetune
    labels = resolve_labels(cache, cfg.data.labels, f"data.labels (cache {cache.root})")
    info["labels"] = labels
    if ft.mode in ("probe", "grid"):
        from ..features.store import FeatureStore, run_extraction
        from .probe import predict_probes, train_probes

        # Every process extracts, or waits on the store's lock for the one extracting and reuses its
        # store (a lock has no time limit; a barrier through a long extraction would). Probes on cached
        # features are cheap: the main process alone trains them, the others wait for the run directory.
        store = FeatureStore(run_extraction(cfg))
        if not _is_main_process():
            return info, {}, []
        studies = load_run_studies(cache, patients, labels, cfg.data.ehr_columns)
        best, cells, features, grid = train_probes(cfg, store, studies, metrics_log, grid=ft.mode == "grid")
        indices = np.concatenate([studies.where("val"), studies.where("test")])
        probs = predict_probes(best.model, features, best.selection, torch.from_numpy(studies.ehr),
                               indices, int(ft.batch_size), next(best.model.parameters()).device)
        frame = studies.frame.iloc[indices].reset_index(drop=True)
        for j, name in enumerate(labels):
            frame[f"prob_{name}"] = probs[:, j]
        head: MultiLabelClassifier = best.model
        info["features"] = {"store": str(store.root.resolve()), "selection": best.selection, "extraction": store.spec}
        info["best_epoch"], info["best_step"] = best.best_epoch, best.best_step
        info["best_val_macro_auroc"] = best.best_val_auroc
        if grid is not None:
            info["grid"] = grid
    else:
        from ..features.backbones import build_denoisers
        from .endtoend import predict_classifier, train_classifier

        if int(ft.concat_features) != 1:
            raise OrthodiffError(
                f"finetune.concat_features={ft.concat_features}: concatenated features are for probe and grid runs; "
                f"{ft.mode} reads features.blocks[0] at features.timesteps[0], so set it to 1"
            )

        planes = [p for p in PLANES if (cache.index["plane"] == p).any()]
        denoisers = build_denoisers(cfg, planes, cache.plane_size)
        datasets = _study_datasets(cache, patients, labels, list(denoisers), cfg, with_segmentation=False)
        model, summary = train_classifier(cfg, denoisers, datasets, labels, metrics_log)
        if not _is_main_process():
            return info, {}, []
        device = next(model.parameters()).device
        import pandas as pd

        frame = pd.concat(
            [predict_classifier(model, datasets[s], s, labels, cfg, device) for s in ("val", "test")], ignore_index=True
        )
        head = model.head
        key = key_name(cfg.features.blocks[0], str(int(cfg.features.timesteps[0])))
        info["features"] = {"selection": {plane: [key] for plane in head.planes}}
        info.update(run_summary(summary))
        _save_denoisers(model.backbone.denoisers, out)
    _save_head(head, out, info)
    frame = _prediction_columns(frame, labels)
    write_table(out / "predictions.csv", frame)
    per_patient = patient_level(frame, labels)
    write_table(out / "predictions_patient.csv", per_patient)
    metrics, warnings = {}, []
    for split in ("val", "test"):
        scores, macro, notes = auroc_scores(per_patient, labels, split)
        metrics[split] = {"macro_auroc": macro, "auroc": scores, "level": "patient"}
        warnings += notes
    info["explain"] = head.explain()
    return info, metrics, warnings


def _prediction_columns(frame, labels):
    columns = ["study_id", "patient_id", "split", "site", "field_strength"]
    columns += [f"prob_{n}" for n in labels] + [f"label_{n}" for n in labels]
    return frame[columns]


# ------------------------------------------------------------------------------- segment
def _segment(cfg, cache, patients, info, out: Path, metrics_log):
    from ..features.backbones import build_denoisers
    from .endtoend import train_segmenter

    classes = resolve_classes(cfg, cache)
    info["classes"] = classes
    planes = [p for p in PLANES if (cache.index["plane"] == p).any()]
    denoisers = build_denoisers(cfg, planes, cache.plane_size)
    datasets = _study_datasets(cache, patients, [], list(denoisers), cfg, with_segmentation=True)
    train_rows = cache.series(patient_ids=patients["train"])
    if not train_rows["seg"].fillna("").astype(str).str.len().gt(0).any():
        raise OrthodiffError(f"{cache.root}: no training series has a segmentation; segment needs <plane>_seg files")
    model, summary = train_segmenter(cfg, denoisers, datasets, len(classes), metrics_log)
    if not _is_main_process():
        return info, {}, []
    if cfg.finetune.segmenter == "pixel":
        info["features"] = {"segmenter": "pixel", **summary["pixel"]["chosen"]}
        info["pixel"] = summary["pixel"]
    else:
        info["features"] = {"blocks": list(model.backbone.extractors[planes[0]].blocks),
                            "timestep": str(int(cfg.features.timesteps[0]))}
    info["segmenter"] = cfg.finetune.segmenter
    info["class_weights"] = summary["class_weights"]
    info.update(run_summary(summary))
    _save_denoisers(model.backbone.denoisers, out)
    _save_head(model.head, out, info)

    metrics, warnings = write_segmentations(cfg, cache, model, datasets, len(classes), out)
    return info, metrics, warnings


def write_segmentations(cfg, cache, model, datasets: dict, num_classes: int, out: Path) -> tuple[dict, list]:
    """Predict val and test with ``model`` and write the segmentation run-directory contract
    (``segmentations/index.csv`` and uint8 .npy masks); returns (metrics, warnings)."""
    from ..features.store import study_series
    from .endtoend import mean_dice, predict_segmenter

    series_of = {(r.study_id, r.plane): r.series_id for r in study_series(cache.index).itertuples()}
    rows, metrics = [], {}
    for split in ("val", "test"):
        results = predict_segmenter(model, datasets[split], cfg, next(model.parameters()).device)
        metrics[split] = {"mean_dice": mean_dice(results, num_classes), "series": len(results)}
        for result in results:
            series_id = series_of[(result["study_id"], result["plane"])]
            stem = f"segmentations/{split}/{safe_filename(series_id)}"
            pred, target = f"{stem}_pred.npy", f"{stem}_target.npy"
            _save_npy(out / pred, result["pred"])
            _save_npy(out / target, result["target"])
            row = {
                "series_id": series_id, "study_id": result["study_id"], "patient_id": result["patient_id"],
                "split": split, "site": result["site"], "field_strength": result["field_strength"],
                "plane": result["plane"], "pred": pred, "target": target,
                "spacing": _tensor_spacing(cache, series_id),
            }
            if cfg.finetune.source_geometry:
                row["pred_source"] = f"{stem}_pred_source.npy"
                _save_npy(out / row["pred_source"], _on_source_grid(cache, series_id, result["pred"]))
            rows.append(row)
    import pandas as pd

    columns = ["series_id", "study_id", "patient_id", "split", "site", "field_strength", "plane", "pred", "target", "spacing"]
    columns += ["pred_source"] if cfg.finetune.source_geometry else []
    write_table(out / "segmentations" / "index.csv", pd.DataFrame(rows, columns=columns))
    warnings = [f"no {split} study has a segmentation: Dice undefined" for split in ("val", "test")
                if metrics[split]["mean_dice"] is None]
    return metrics, warnings


def resolve_classes(cfg, cache) -> list[str]:
    """``finetune.classes``, else the archive's ``archive.json`` classes, else class_<k> up to the
    largest label found in the training segmentations."""
    if cfg.finetune.classes:
        return [str(c) for c in cfg.finetune.classes]
    archive = Path(cfg.data.archive) / "archive.json"
    if archive.exists():
        classes = read_json(archive).get("classes") or []
        if len(classes) >= 2:
            return [str(c) for c in classes]
    largest = 0
    for series_id in cache.index["series_id"]:
        seg = cache.seg(series_id)
        if seg is not None:
            largest = max(largest, int(np.max(seg)))
    if largest < 1:
        raise OrthodiffError(f"{cache.root}: no segmentation with a structure; segment needs <plane>_seg files")
    return ["background"] + [f"class_{k}" for k in range(1, largest + 1)]


# ------------------------------------------------------------------------------- helpers
def _is_main_process() -> bool:
    """On several processes (``accelerate launch``, ``torchrun``) all train end to end, the main one
    alone trains probes; the main one predicts and writes the run directory."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _study_datasets(cache, patients, labels, planes, cfg, with_segmentation: bool) -> dict:
    from ..data.datasets import StudyDataset
    from .augment import make_study_augment

    augment = make_study_augment() if cfg.finetune.augment else None
    common = {"labels": labels, "planes": planes, "ehr_columns": cfg.data.ehr_columns, "with_segmentation": with_segmentation}
    train = StudyDataset(cache, patients["train"], augment=augment, **common)
    datasets = {"train": train}
    for split in ("val", "test"):
        datasets[split] = StudyDataset(cache, patients[split], ehr_stats=train.ehr_stats, **common)
    return datasets


def _save_head(head, out: Path, info: dict) -> None:
    """The head's weights (safetensors) with a JSON that names what it was trained for."""
    from safetensors.torch import save_file

    from ..fileio import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(tensors, str(tmp))
    spec = {"task": info["task"], "labels": info["labels"], "classes": info["classes"],
            "pooling": info["pooling"], "readout_grid": info["readout_grid"],
            "fusion": info["fusion"], "use_ehr": info["use_ehr"],
            "planes": list(head.planes), "features": info.get("features", {})}
    if hasattr(head, "image_channels"):  # segmentation decoders also read the plane tensor
        spec["image_channels"] = int(head.image_channels)
    if hasattr(head, "image_stem"):
        spec["image_stem"] = int(head.image_stem)
    write_json(out / "head.json", spec)


def _save_denoisers(denoisers, out: Path) -> None:
    """Fine-tuned (or frozen) denoisers beside the head, so the run rebuilds its model alone."""
    for plane, denoiser in denoisers.items():
        denoiser.save_pretrained(out / "denoisers" / plane)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from ..fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.uint8))


def _on_source_grid(cache, series_id: str, pred: np.ndarray) -> np.ndarray:
    """A plane-tensor prediction mapped back onto the series' own voxel grid (nearest neighbour)."""
    from ..data.prepare import to_source_geometry

    geometry = cache.geometry(series_id)
    return to_source_geometry(pred, geometry["tensor_affine"], geometry["source_shape"], geometry["source_affine"],
                              is_label=True, crop_box=geometry["crop_box"])


def _tensor_spacing(cache, series_id: str) -> str:
    import json

    affine = cache.geometry(series_id)["tensor_affine"]
    return json.dumps([round(float(v), 6) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)])


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


__all__ = ["FinetuneResult", "resolve_classes", "run_finetune"]
