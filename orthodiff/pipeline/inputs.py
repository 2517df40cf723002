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
ORIGIN = "_origin"  # the input a row came from (its folder for a file given alone)
METADATA_COLUMNS = ("patient_id", "age", "sex", "height", "weight", "site", "field_strength")


@dataclass
class StudyInput:
    """One study to predict: its series rows (manifest-like dicts) per plane, preferred first."""

    study_id: str
    rows: dict = field(default_factory=dict)  # {plane: [row, ...]}
    metadata: dict = field(default_factory=dict)

    def chosen(self, plane: str):
        """The series used for ``plane`` (the one training's ``data.series`` prefers), or None."""
        rows = self.rows.get(plane) or []
        return rows[0] if rows else None

    def ignored(self) -> list[str]:
        """Series not used because their plane had several (e.g. echoes); listed in prediction.json."""
        return [str(row["series_id"]) for rows in self.rows.values() for row in rows[1:]]


def collect_studies(inputs, selection=None) -> tuple[list[StudyInput], list[dict]]:
    """(studies in study_id order, error rows {input, study_id, reason}) for the given paths.

    A study's identity is unique across all inputs: studies of different inputs that share a
    study id (a scanner's StudyID counter, two folders named ``exam1``) stay apart and are named
    by their StudyInstanceUID, else by their input path. ``selection`` (``data.series``) orders
    each plane's series so that the preferred one is used.
    """
    rows, errors = [], []
    for path in dict.fromkeys(Path(p) for p in inputs):
        try:
            if path.is_dir():
                found, problems = _scan_folder(path)
                rows += _with_origin(found, path)
                errors += problems
            elif path.is_file():
                found = _file_rows(path)
                # files given one by one belong together when they share a folder (one exam's planes)
                rows += _with_origin(found, path if path.suffix in MANIFEST_SUFFIXES else path.parent)
            else:
                raise OrthodiffError(f"{path}: not found; give a DICOM folder, an image file or a manifest")
        except OrthodiffError as exc:
            errors.append({"input": str(path), "study_id": "", "reason": _one_line(exc)})
    studies, unselected = _group(_unique_study_ids(rows), selection)
    return studies, errors + unselected


def _with_origin(rows: list[dict], origin: Path) -> list[dict]:
    where = str(origin.resolve())
    return [{**row, ORIGIN: where} for row in rows]


def _unique_study_ids(rows: list[dict]) -> list[dict]:
    """Rename study ids that different inputs share: to the StudyInstanceUID when known, else to
    "<input path>/<study id>". Inputs holding one DICOM study (the same StudyInstanceUID, e.g. its
    planes given as separate folders) stay one study."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((str(row["study_id"]), row[ORIGIN]), []).append(row)
    by_short: dict = {}
    for short, origin in groups:
        by_short.setdefault(short, []).append(origin)
    for short, origins in by_short.items():
        if len(origins) < 2:
            continue
        uids = {origin: _study_uid(groups[(short, origin)]) for origin in origins}
        counts: dict = {}
        for uid in uids.values():
            counts[uid] = counts.get(uid, 0) + 1
        for origin in origins:
            uid = uids[origin]
            if uid and counts[uid] == len(origins):
                continue  # one study given in parts: keep its id
            name = uid or f"{origin}/{short}"  # inputs sharing a UID hold parts of one study: merged
            for row in groups[(short, origin)]:
                series_id = str(row["series_id"])
                rest = series_id[len(short) + 1:] if series_id.startswith(f"{short}/") else series_id
                row["study_id"], row["series_id"] = name, f"{name}/{rest}"
    return rows


def _study_uid(rows: list[dict]) -> str:
    """The StudyInstanceUID of a DICOM study's rows ("" when not DICOM or unreadable)."""
    for row in rows:
        if row.get("format") != "dicom":
            continue
        try:
            import pydicom

            from ..io.dicom import dicom_files_in

            files = dicom_files_in(row["path"])
            if files:
                header = pydicom.dcmread(str(files[0]), stop_before_pixels=True, force=True,
                                         specific_tags=["StudyInstanceUID"])
                return str(header.get("StudyInstanceUID", "") or "")
        except Exception:  # noqa: BLE001  an unreadable header just means: name by path
            return ""
    return ""


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


def _group(rows: list[dict], selection=None) -> tuple[list[StudyInput], list[dict]]:
    """Studies of ``rows``, each plane's series in preference order; error rows for studies
    that the selection leaves without a series."""
    import pandas as pd

    from ..data.selection import filter_series, order_by_preference

    if not rows:
        return [], []
    frame = pd.DataFrame(rows)
    kept = order_by_preference(filter_series(frame, selection, "pipeline series selection"), selection)
    errors = [{"input": str(Path(str(group["path"].iloc[0])).parent), "study_id": str(study),
               "reason": f"study {study}: no series passes the pipeline's series selection ({_describe(selection)})"}
              for study, group in frame.groupby("study_id", sort=True) if study not in set(kept["study_id"])]
    studies: dict[str, StudyInput] = {}
    for row in kept.to_dict("records"):
        row = {key: value for key, value in row.items() if key != ORIGIN}
        study = studies.setdefault(str(row["study_id"]), StudyInput(str(row["study_id"])))
        study.rows.setdefault(row["plane"], []).append(row)
        for column in METADATA_COLUMNS:
            value = row.get(column)
            if column not in study.metadata and _known(value):
                study.metadata[column] = value
    return [studies[key] for key in sorted(studies)], errors


def _describe(selection) -> str:
    from ..data.selection import check_selection

    return check_selection(selection).describe()


def _known(value) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _one_line(exc) -> str:
    return " ".join(str(exc).split())
