"""What ``orthodiff predict`` was given, as studies: DICOM exam folders (or folder trees), NIfTI /
NRRD / MHA files, and manifests, grouped by study. Series and planes are found by the scan code
(geometry, never file names); an input that yields nothing usable becomes an error row."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OrthodiffError, ScanError
from ..io.volume import suffix_of
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

    Each input is read alone and a study's id is a function of the study alone, so what else is
    predicted beside it never changes its series, its id or its numbers: the readable id its input
    gives (StudyID, folder name) and the first 8 hex digits of the sha256 of its identity (its
    StudyInstanceUID, else the folder that holds its series). Exams that share a StudyID or a folder
    name therefore stay apart, and parts of one DICOM study given as separate inputs stay one study.
    An input given twice (say as a relative and as an absolute path) and a series reached through
    two inputs are read once; the error rows name the input it repeats. ``selection``
    (``data.series``) orders each plane's series so that the preferred one is used.
    """
    rows, errors = [], []
    files_by_folder: dict[Path, list[Path]] = {}  # image files given one by one: an exam's planes
    for path, problem in _distinct_inputs(inputs):
        if problem:
            errors.append({"input": str(path), "study_id": "", "reason": problem})
            continue
        try:
            if path.is_dir():
                found, problems = _scan_folder(path)
                rows += _with_origin(found, path)
                errors += problems
            elif path.is_file() and suffix_of(path) in MANIFEST_SUFFIXES:
                rows += _with_origin(_manifest_rows(path), path)
            elif path.is_file():
                _check_image_file(path)
                files_by_folder.setdefault(path.parent, []).append(path)
            else:
                raise OrthodiffError(f"{path}: not found; give a DICOM folder, an image file or a manifest")
        except OrthodiffError as exc:
            errors.append({"input": str(path), "study_id": "", "reason": _one_line(exc)})
    for folder, files in files_by_folder.items():
        found, problems = _scan_files(files)
        rows += _with_origin(found, folder)
        errors += problems
    rows, repeated = _drop_repeated_series(rows)
    studies, unselected = _group(_name_studies(rows), selection)
    return studies, errors + repeated + unselected


def _distinct_inputs(inputs):
    """(path, None) per input, or (path, why it is skipped) for one that names an earlier input's
    file or folder again (the same path written another way, or through a link)."""
    seen: dict[Path, str] = {}
    for given in inputs:
        path = Path(given)
        where = path.resolve()
        if where in seen:
            yield path, f"{path}: the same input as {seen[where]}, given again; read once"
            continue
        seen[where] = str(path)
        yield where, None


def _with_origin(rows: list[dict], origin: Path) -> list[dict]:
    where = str(origin.resolve())
    return [{**row, ORIGIN: where} for row in rows]


def _drop_repeated_series(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The first of the rows that show one series (an exam folder and its plane folder, a folder and
    a file in it, given both); an error row names the input that repeated it."""
    first: dict = {}
    kept, repeated = [], []
    for row in rows:
        key = (str(Path(str(row["path"])).resolve()), str(row.get("series_uid") or ""), int(row.get("echo_index", -1)))
        if first.setdefault(key, row[ORIGIN]) != row[ORIGIN]:
            reason = (f"{row['path']}: series {row['series_id']} of the input {row[ORIGIN]} is also in the input "
                      f"{first[key]}; used once")
            repeated.append({"input": str(row["path"]), "study_id": "", "reason": reason})
            continue
        kept.append(row)
    return kept, repeated


def _name_studies(rows: list[dict]) -> list[dict]:
    """Rows renamed to their studies' ids: ``<readable id>-<8 hex of the study's identity>``; a
    manifest's study keeps the manifest's id (its archive's unique id, the one its labels use)
    unless another study of these inputs has it too.

    A study is the rows of one input that share the input's study id, joined with the rows of
    other inputs that share its StudyInstanceUID (one DICOM study given in parts)."""
    import hashlib

    parts: dict = {}
    for row in rows:
        parts.setdefault((row[ORIGIN], str(row["study_id"])), []).append(row)
    studies: dict = {}  # identity -> [(readable id, rows), ...]
    for (_, readable), members in parts.items():
        uid = _study_uid(members)
        identity = f"dicom:{uid}" if uid else f"folder:{_common_folder(members)}/{readable}"
        studies.setdefault(identity, []).append((readable, members))
    readers: dict = {}  # readable id -> identities
    for identity, named in studies.items():
        readers.setdefault(min(name for name, _ in named), set()).add(identity)
    for identity, named in studies.items():
        readable = min(name for name, _ in named)
        from_manifests = all(suffix_of(members[0][ORIGIN]) in MANIFEST_SUFFIXES for _, members in named)
        study_id = readable if from_manifests and len(readers[readable]) == 1 else (
            f"{readable}-{hashlib.sha256(identity.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}")
        for name, members in named:
            for row in members:
                series_id = str(row["series_id"])
                rest = series_id[len(name) + 1:] if series_id.startswith(f"{name}/") else series_id
                row["study_id"], row["series_id"] = study_id, f"{study_id}/{rest}"
    return rows


def _common_folder(rows: list[dict]) -> str:
    """The deepest folder holding every series of ``rows`` (a DICOM series is its folder)."""
    import os

    folders = []
    for row in rows:
        path = Path(str(row["path"])).resolve()
        folders.append(str(path if row.get("format") == "dicom" else path.parent))
    return os.path.commonpath(folders)


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
        except Exception:  # noqa: BLE001  an unreadable header just means: named by its folder
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


def _check_image_file(path: Path) -> None:
    """Refuse, in one line, a file given alone that cannot be a series: not an image, one DICOM
    slice, a segmentation."""
    from ..data.scan import segmentation_base
    from ..io.volume import ITK_SUFFIXES, NIFTI_SUFFIXES

    suffix = suffix_of(path)
    if suffix not in NIFTI_SUFFIXES + ITK_SUFFIXES:
        from ..io.dicom import looks_like_dicom

        if looks_like_dicom(path):
            raise OrthodiffError(f"{path}: a single DICOM file; give the folder that holds the whole series or exam")
        raise OrthodiffError(
            f"{path}: not an image (expected a DICOM folder, NIfTI, NRRD/MHA or a manifest .csv/.parquet)"
        )
    if segmentation_base(path.name[: len(path.name) - len(suffix)]) is not None:
        raise OrthodiffError(f"{path}: a segmentation file, not an image series; skipped (give the image beside it)")


def _scan_files(files: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows of image files of one folder, read as a scan of that folder reads them (so an exam
    given as its files is the exam given as its folder), and their problems."""
    from ..data.scan import scan_files

    try:
        frame, problems = scan_files(files, check_voxels=False)
    except ScanError as exc:
        return [], [{"input": str(files[0]), "study_id": "", "reason": _one_line(exc)}]
    return frame.to_dict("records"), [{"input": p.path, "study_id": "", "reason": _one_line(p.reason)} for p in problems]


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
