"""What ``orthodiff predict`` was given, as studies: DICOM exam folders (or folder trees), NIfTI /
NRRD / MHA files, and manifests, grouped by study. Series and planes are found by the scan code
(geometry, never file names); an input that yields nothing usable becomes an error row."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OrthodiffError, ScanError
from ..planes import PLANES

MANIFEST_SUFFIXES = (".csv", ".parquet")
METADATA_COLUMNS = ("patient_id", "age", "sex", "height", "weight", "site", "field_strength")


@dataclass
class StudyInput:
    """One study to predict: its series rows (manifest-like dicts) per plane, in sorted series order."""

    study_id: str
    rows: dict = field(default_factory=dict)  # {plane: [row, ...]}
    metadata: dict = field(default_factory=dict)

    def chosen(self, plane: str):
        """The series used for ``plane`` (the first in series_id order, as training used), or None."""
        rows = self.rows.get(plane) or []
        return rows[0] if rows else None

    def ignored(self) -> list[str]:
        """Series not used because their plane had several (e.g. echoes); listed in prediction.json."""
        return [str(row["series_id"]) for rows in self.rows.values() for row in rows[1:]]


def collect_studies(inputs) -> tuple[list[StudyInput], list[dict]]:
    """(studies in study_id order, error rows {input, study_id, reason}) for the given paths."""
    rows, errors = [], []
    for path in inputs:
        path = Path(path)
        try:
            if path.is_dir():
                found, problems = _scan_folder(path)
                rows += found
                errors += problems
            elif path.is_file():
                rows += _file_rows(path)
            else:
                raise OrthodiffError(f"{path}: not found; give a DICOM folder, an image file or a manifest")
        except OrthodiffError as exc:
            errors.append({"input": str(path), "study_id": "", "reason": _one_line(exc)})
    return _group(rows), errors


def _scan_folder(folder: Path) -> tuple[list[dict], list[dict]]:
    """Every series under ``folder`` (scan_archive, into a throwaway manifest) and the scan's problems."""
    from ..data.scan import scan_archive

    with tempfile.TemporaryDirectory(prefix="orthodiff-predict-") as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        try:
            result = scan_archive(folder, manifest, check_voxels=False)
        except OrthodiffError:
            problems = _scan_problems(Path(tmp) / "manifest.errors.csv")
            reason = f"{folder}: no usable image series found (DICOM, NIfTI or NRRD/MHA)"
            if problems:
                reason += f"; {len(problems)} file problem(s) listed below it"
            return [], [{"input": str(folder), "study_id": "", "reason": reason}] + problems
    problems = [{"input": p.path, "study_id": "", "reason": _one_line(p.reason)} for p in result.errors]
    return result.manifest.to_dict("records"), problems


def _scan_problems(errors_csv: Path) -> list[dict]:
    import pandas as pd

    if not errors_csv.exists():
        return []
    frame = pd.read_csv(errors_csv, dtype=str).fillna("")
    return [{"input": row["path"], "study_id": "", "reason": _one_line(row["reason"])} for _, row in frame.iterrows()]


def _file_rows(path: Path) -> list[dict]:
    from ..data.scan import segmentation_base
    from ..io.volume import ITK_SUFFIXES, NIFTI_SUFFIXES, read_volume_header, suffix_of
    from ..planes import plane_from_affine

    suffix = suffix_of(path)
    if suffix in MANIFEST_SUFFIXES:
        return _manifest_rows(path)
    if suffix not in NIFTI_SUFFIXES + ITK_SUFFIXES:
        from ..io.dicom import looks_like_dicom

        if looks_like_dicom(path):
            raise OrthodiffError(f"{path}: a single DICOM file; give the folder that holds the whole series or exam")
        raise OrthodiffError(
            f"{path}: not an image (expected a DICOM folder, NIfTI, NRRD/MHA or a manifest .csv/.parquet)"
        )
    stem = path.name[: len(path.name) - len(suffix)]
    if segmentation_base(stem) is not None:
        raise OrthodiffError(f"{path}: a segmentation file, not an image series; skipped (give the image beside it)")
    try:
        header = read_volume_header(path)
    except ScanError as exc:
        raise OrthodiffError(_one_line(exc)) from None
    if len(header.shape) < 3 or header.shape[2] < 3:
        raise OrthodiffError(f"{path}: a 2D image or localizer (shape {tuple(header.shape)}); a series needs at least 3 slices")
    plane = plane_from_affine(header.affine)
    study = path.parent.name or "study"
    return [{"study_id": study, "series_id": f"{study}/{plane}/{stem}", "plane": plane, "path": str(path.resolve()),
             "format": "nifti" if suffix in NIFTI_SUFFIXES else "itk", "series_uid": "", "echo_index": -1}]


def _manifest_rows(path: Path) -> list[dict]:
    from ..data.manifest import read_manifest

    frame = read_manifest(path)
    unknown = sorted(set(frame["plane"]) - set(PLANES))
    if unknown:
        raise OrthodiffError(f"{path}: unknown plane(s) {unknown} in the plane column; use {', '.join(PLANES)}")
    return frame.to_dict("records")


def _group(rows: list[dict]) -> list[StudyInput]:
    studies: dict[str, StudyInput] = {}
    for row in sorted(rows, key=lambda r: (str(r["study_id"]), str(r["series_id"]))):
        study = studies.setdefault(str(row["study_id"]), StudyInput(str(row["study_id"])))
        study.rows.setdefault(row["plane"], []).append(row)
        for column in METADATA_COLUMNS:
            value = row.get(column)
            if column not in study.metadata and _known(value):
                study.metadata[column] = value
    return [studies[key] for key in sorted(studies)]


def _known(value) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _one_line(exc) -> str:
    return " ".join(str(exc).split())
