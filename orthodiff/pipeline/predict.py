"""``orthodiff predict PIPELINE INPUT... --out OUT``: predict new studies and explain the answers.

Per study, OUT/<study_id>/ holds::

    prediction.json                        probability, threshold and decision per label; planes used,
                                           planes missing (with why); files per series; per plane, how
                                           the series differs from the training series
                                           (``out_of_distribution``, see ``pipeline.domain``; null when
                                           the pipeline does not record its training domain)
    segmentation_<plane>.nii.gz            uint8 labels on the series' own voxel grid and affine
    segmentation_<plane>.dcm               the same as a DICOM Segmentation referencing the source
                                           series (DICOM inputs only; segments named by class)
    segmentation_<plane>.png               overlay on three central slices
    heatmap_<label>_<plane>.nii.gz / .png  Grad-CAM in [0, 1] (uint8 x 1/255), series grid / overlay
    report.html                            one page with all of the above

OUT/predictions.csv has one row per predicted study (its ``out_of_distribution`` column holds the
notes, empty when none), OUT/errors.csv one row per input or study
that could not be predicted (the others go on). A study folder is written under a temporary name
and renamed when complete, so a folder that exists is whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError, ScanError
from ..fileio import atomic_directory, disk_full_errno, safe_filename, write_json, write_table
from ..locks import exclusive
from .domain import notes_text, study_notes
from .inputs import StudyInput, collect_studies

logger = logging.getLogger(__name__)

PREDICTION_FORMAT = "orthodiff-prediction"
ERROR_COLUMNS = ["input", "study_id", "reason"]
RUN_FILES = ("errors.csv", "predictions.csv", ".predict.lock")  # OUT's own files: never a study's name
# One noise draw for every study: a study's numbers depend on its images, never on its name or on the
# other studies of the run.
NOISE_KEY = "orthodiff-predict"
UNKNOWN_DOMAIN = ("the pipeline does not record what it was trained on (exported before that was recorded), so "
                  "inputs unlike its training data cannot be pointed out; export it again to have them compared")
STALE_AFTER_S = 600.0
# staging and set-aside folders of fileio.atomic_directory: ".<name>.<8 random>.tmp", ".<name>.old-<pid>"
_STAGING = re.compile(r"^\..+\.([A-Za-z0-9_]{8}\.tmp|old-\d+)$")


@dataclass
class PredictionResult:
    out: Path
    studies: list = field(default_factory=list)  # study ids written
    errors: list = field(default_factory=list)  # {input, study_id, reason}
    seconds: float = 0.0
    notes: list = field(default_factory=list)  # said once for the whole run

    def describe(self) -> str:
        text = f"Predicted {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'} into {self.out} in {self.seconds:.1f} s"
        if self.studies:
            text += f" (one folder each, summary in {self.out / 'predictions.csv'})"
        if self.errors:
            first = self.errors[0]
            text += f"; {len(self.errors)} problem(s) in {self.out / 'errors.csv'} (first: {first['reason']})"
        return text + "." + "".join(f" Note: {note}." for note in self.notes)


def run_prediction(pipeline_dir, inputs: Sequence, out, explain: bool = True, progress: bool = True) -> PredictionResult:
    """Predict every study found in ``inputs`` with the pipeline at ``pipeline_dir``; write ``out``."""
    from .pipeline import OrthoDiffusionPipeline

    start = time.perf_counter()
    if not inputs:
        raise OrthodiffError("predict: no input given; pass DICOM exam folders, NIfTI files or a manifest")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = OrthoDiffusionPipeline.from_pretrained(pipeline_dir, device=device)
    run_notes = [] if pipeline.training_domain is not None else [UNKNOWN_DOMAIN]
    for note in run_notes:
        logger.warning(note)
    out = Path(out)
    # one run writes OUT at a time, so a staging folder found there is a dead run's
    with exclusive(out, "predict", "predict"):
        return _predict_into(out, pipeline, inputs, explain, progress, Path(pipeline_dir), run_notes, start)


def _predict_into(out: Path, pipeline, inputs, explain: bool, progress: bool, pipeline_dir: Path, run_notes: list,
                  start: float) -> PredictionResult:
    import pandas as pd
    from tqdm import tqdm

    stale = clean_stale_staging(out, older_than=0.0)
    if stale:
        run_notes.append(f"removed {len(stale)} unfinished staging folder(s) that an interrupted run left in {out} "
                         f"({', '.join(stale)})")
        logger.warning(run_notes[-1])
    studies, errors = collect_studies(inputs, selection=pipeline.series_selection)
    written, summary_rows = [], []
    for study in tqdm(studies, desc="predict", unit="study", disable=not progress or None, leave=False):
        try:
            summary = predict_one(pipeline, study, out, explain=explain, pipeline_dir=pipeline_dir)
        except OrthodiffError as exc:
            errors.append({"input": _study_source(study), "study_id": study.study_id, "reason": _one_line(exc)})
            continue
        except Exception as exc:  # noqa: BLE001  odd data must not stop the other studies
            if disk_full_errno(exc) is not None:
                raise  # every later study would fail too: the command stops with one line naming the folder
            reason = f"unexpected {type(exc).__name__} while predicting: {_one_line(exc)}"
            errors.append({"input": _study_source(study), "study_id": study.study_id, "reason": reason})
            continue
        written.append(study.study_id)
        summary_rows.append(_summary_row(summary))
    with _naming_a_full_disk(out / "errors.csv"):
        write_table(out / "errors.csv", pd.DataFrame(errors, columns=ERROR_COLUMNS))
    if summary_rows:
        with _naming_a_full_disk(out / "predictions.csv"):
            write_table(out / "predictions.csv", pd.DataFrame(summary_rows))
    result = PredictionResult(out=out, studies=written, errors=errors, seconds=time.perf_counter() - start,
                              notes=run_notes)
    if not written:
        first = errors[0]["reason"] if errors else "no study found in the inputs"
        raise OrthodiffError(f"no study could be predicted: {first} (every problem is listed in {out / 'errors.csv'})")
    return result


def predict_one(pipeline, study: StudyInput, out: Path, explain: bool = True, pipeline_dir: Path | None = None) -> dict:
    """Predict one study and write its folder atomically; returns the prediction.json content."""
    from ..data.manifest import load_series

    volumes, notes, paths = {}, {}, {}
    for plane in pipeline.planes:
        row = study.chosen(plane)
        if row is None:
            continue
        try:
            volumes[plane] = load_series(row)
            paths[plane] = row
        except ScanError as exc:
            notes[plane] = f"{plane} series {row['series_id']} unreadable: {_one_line(exc)}"
    prediction = pipeline.predict_study(volumes, study.study_id, metadata=study.metadata, explain=explain, notes=notes,
                                        noise_key=NOISE_KEY)
    folder = _study_folder(out, study.study_id)
    with _naming_a_full_disk(folder), atomic_directory(folder) as staging:
        summary = _write_study(pipeline, prediction, paths, volumes, study, staging, pipeline_dir)
    return summary


def _write_study(pipeline, prediction, rows: dict, volumes: dict, study: StudyInput, folder: Path, pipeline_dir) -> dict:
    from .dicom_seg import source_datasets, write_dicom_seg
    from .gradcam import TARGET_DESCRIPTION
    from .report import SourceView, heatmap_png, segmentation_png, write_report

    summary = {"format": PREDICTION_FORMAT, "version": 1, **prediction.to_json(),
               "patient_id": str(study.metadata.get("patient_id", "")),
               "pipeline": str(Path(pipeline_dir).resolve()) if pipeline_dir else "",
               "gradcam_target": TARGET_DESCRIPTION, "series": {}, "notes": [],
               "out_of_distribution": study_notes(pipeline.training_domain, prediction.series, rows)}
    if prediction.planes_missing:
        summary["notes"].append(
            f"predicted without {', '.join(prediction.planes_missing)}: the head used its learned stand-in for "
            "a missing plane, so these probabilities rest on fewer views"
        )
    ignored = study.ignored()
    if ignored:
        summary["notes"].append(f"several series for one plane; used the preferred one of each (data.series.prefer), "
                                f"ignored {', '.join(ignored)}")
    pictures: dict = {}
    segmentation_pictures: dict = {}
    for plane, item in prediction.series.items():
        row = rows[plane]
        entry = {"series_id": str(row["series_id"]), "source": str(row["path"]), "shape": list(item.source_shape),
                 "heatmaps": {}}
        view = SourceView(volumes[plane].array, item.source_affine, item.tensor_affine)  # pictures at source resolution
        if item.segmentation is not None:
            name = f"segmentation_{plane}.nii.gz"
            _save_nifti(folder / name, item.segmentation.astype(np.uint8), item.source_affine)
            segmentation_pictures[plane] = segmentation_png(folder / f"segmentation_{plane}.png", view,
                                                            item.segmentation).name
            entry["segmentation"] = {"nifti": name, "png": segmentation_pictures[plane], "classes": prediction.classes}
            if row.get("format") == "dicom":
                dicom_name = f"segmentation_{plane}.dcm"
                try:
                    changes = write_dicom_seg(folder / dicom_name, item.segmentation, prediction.classes,
                                              source_datasets(row))
                    entry["segmentation"]["dicom_seg"] = dicom_name
                    entry["segmentation"]["dicom_seg_header_changes"] = [change.to_json() for change in changes]
                except OrthodiffError as exc:  # the source geometry cannot be referenced
                    summary["notes"].append(f"{plane} DICOM SEG not written: {_one_line(exc)}")
                except Exception as exc:  # noqa: BLE001  the NIfTI and the diagnosis still stand
                    summary["notes"].append(f"{plane} DICOM SEG not written: {type(exc).__name__}: {_one_line(exc)}")
        for label, heat in item.heatmaps.items():
            stem = f"heatmap_{safe_filename(label)}_{plane}"
            _save_nifti(folder / f"{stem}.nii.gz", heat, item.source_affine, unit_interval=True)
            heatmap_png(folder / f"{stem}.png", view, heat)
            pictures.setdefault(label, {})[plane] = f"{stem}.png"
            entry["heatmaps"][label] = {"nifti": f"{stem}.nii.gz", "png": f"{stem}.png",
                                        "shows": "evidence for" if prediction.decisions[label] else "evidence against",
                                        "empty": bool(float(np.max(heat)) <= 0.0)}
        summary["series"][plane] = entry
    write_report(folder / "report.html", summary, pictures, segmentation_pictures, TARGET_DESCRIPTION)
    summary["report"] = "report.html"
    write_json(folder / "prediction.json", summary)
    return summary


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, unit_interval: bool = False) -> None:
    """A NIfTI on the series grid; ``unit_interval`` maps in [0, 1] are stored as uint8 with a
    1/255 scale slope (readers return floats; a quarter of the bytes to compress and write)."""
    import nibabel as nib

    from ..fileio import atomic_path

    if unit_interval:
        array = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    image = nib.Nifti1Image(array, affine)
    if unit_interval:
        image.header.set_slope_inter(1.0 / 255.0, 0.0)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def _summary_row(summary: dict) -> dict:
    row = {"study_id": summary["study_id"], "planes_used": "+".join(summary["planes_used"]),
           "planes_missing": "+".join(summary["planes_missing"])}
    for label, entry in summary["labels"].items():
        row[f"prob_{label}"] = entry["probability"]
        row[f"decision_{label}"] = int(entry["decision"])
    row["out_of_distribution"] = notes_text(summary.get("out_of_distribution"))
    return row


def _study_folder(out: Path, study_id: str) -> Path:
    """``OUT/<study folder>``, refused in one line when it holds anything but an earlier prediction
    of this study (another study's, whose id cleans to the same name, or a folder not ours): a
    study never overwrites what is not its own. OUT is locked, so no other run claims it meanwhile."""
    folder = out / safe_filename(study_id)
    if folder.name in RUN_FILES:
        raise OrthodiffError(f"study {study_id}: its folder name {folder.name} is one of OUT's own files; "
                             "rename the study (its folder or StudyID) to predict it")
    if not (folder.exists() or folder.is_symlink()):
        return folder
    owner = _folder_owner(folder)
    if owner != study_id:
        held = f"the prediction of study {owner}" if owner else "files that are not a prediction of this study"
        raise OrthodiffError(f"{folder}: already holds {held}; study {study_id} was not written, predict it into "
                             "another --out (nothing was overwritten)")
    return folder


def _folder_owner(folder: Path) -> str | None:
    """The study whose prediction a folder holds, or None (not a folder, not a prediction)."""
    from ..fileio import read_json

    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        summary = read_json(folder / "prediction.json")
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("format") != PREDICTION_FORMAT:
        return None
    return str(summary.get("study_id"))


def _study_source(study: StudyInput) -> str:
    for rows in study.rows.values():
        if rows:
            return str(Path(str(rows[0]["path"])).parent)
    return ""


def clean_stale_staging(out: Path, older_than: float = STALE_AFTER_S) -> list[str]:
    """Remove staging folders that a killed run left in ``out``: hidden ``.<name>.<random>.tmp``
    and ``.<name>.old-<pid>`` folders (the names ``atomic_directory`` gives), untouched for
    ``older_than`` seconds. ``run_prediction`` calls it holding OUT's lock, when no other run can
    be writing there, so every one is stale (``older_than`` 0). Returns the names removed."""
    import shutil

    removed = []
    now = time.time()
    for entry in sorted(Path(out).iterdir()):
        if not (entry.is_dir() and not entry.is_symlink() and _STAGING.match(entry.name)):
            continue
        newest = max([entry.lstat().st_mtime] + [p.lstat().st_mtime for p in entry.rglob("*")])
        if now - newest >= older_than:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextlib.contextmanager
def _naming_a_full_disk(path: Path):
    """A full disk names ``path``, the output being written (a failed write() names no file, and a temporary
    name is gone once the atomic writer has cleaned up)."""
    try:
        yield
    except OSError as exc:
        if disk_full_errno(exc) is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


def _one_line(exc) -> str:
    return " ".join(str(exc).split())
