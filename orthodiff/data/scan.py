"""``orthodiff scan``: find every series in an archive folder tree and write the manifest.

Walk -> one record per 3D volume (NIfTI, NRRD/MHA, DICOM folders split by series, orientation
and echo, MRNet .npy) -> checks (2D, localizer, derived, damaged, NaN/Inf, constant) -> plane
from geometry -> segmentations beside their series -> studies and patients -> labels, metadata
and sequence columns -> manifest. Every problem becomes one row of the errors file and the scan
goes on. Folders are read on every core; ``--shard I/N`` scans one part of a large archive and
``orthodiff.data.scan_merge`` merges the parts.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError, ScanError
from ..io.dicom import DicomVolume, access_problem, index_dicom_files, looks_like_dicom, read_dicom_volume
from ..io.mrnet import SPLITS as MRNET_SPLITS
from ..io.mrnet import mrnet_affine, mrnet_shape, read_mrnet
from ..io.volume import ITK_SUFFIXES, NIFTI_SUFFIXES, read_volume, read_volume_header, suffix_of
from ..planes import PLANES, plane_from_affine
from .diagnostic import derived_reason, localizer_reason
from .manifest import LABEL_PREFIX
from .sequence import CONTRASTS, FLOAT_COLUMNS, SEQUENCE_COLUMNS, TEXT_COLUMNS, read_sidecar, sequence_fields
from .study_tables import (
    METADATA_FIELDS,
    LabelTable,
    MetadataTable,
    dicom_age_years,
    field_strength_tesla,
    merge_labels,
    normalise_sex,
    read_labels_csv,
    read_metadata_csv,
    read_mrnet_labels,
)
from .walk import walk_archive

SEGMENTATION_MARKERS = ("_seg", "_label", "-label", "_mask")
# Files that are never scans: tables, notes, pictures, companions of .mhd/.nhdr headers.
IGNORED_SUFFIXES = frozenset(
    ".csv .tsv .json .txt .md .rst .pdf .xml .html .log .yaml .yml .py .ipynb .sh .png .jpg .jpeg "
    ".gif .bmp .svg .zip .tar .pkl .parquet .raw .zraw .bval .bvec".split()
)
KEEP_SERIES_NAME = "keep_series.txt"  # series kept although judged localizer or derived
MANIFEST_COLUMNS = [
    "patient_id", "study_id", "series_id", "plane", "path", "format",
    "series_uid", "echo_index", "echo_time",
    "n_slices", "rows", "cols", "spacing_slice", "spacing_row", "spacing_col",
    "normal_x", "normal_y", "normal_z",
    "seg_path",
    "joint", "site", "field_strength", "age", "sex", "height", "weight",
    *SEQUENCE_COLUMNS, "study_key",
]  # fmt: skip
INT_COLUMNS = ("echo_index", "n_slices", "rows", "cols")
ERROR_COLUMNS = ["path", "reason"]


@dataclass
class ScanProblem:
    path: str
    reason: str


@dataclass
class FoundSeries:
    """One 3D volume found on disk, before it is placed in a study."""

    path: Path  # a file, or the DICOM folder
    format: str  # nifti | itk | dicom | mrnet
    shape: tuple  # (i, j, k): k runs across slices
    affine: np.ndarray  # voxel -> RAS mm
    name: str  # file stem or folder name: segmentations pair on it
    series_uid: str = ""
    echo_index: int = -1
    echo_rank: int = -1  # rank among the echoes of its series (and orientation); names "echoN"
    echo_time: float = math.nan
    tags: dict = field(default_factory=dict)  # DICOM patient/study/site tags
    dicom: DicomVolume | None = None
    mrnet: tuple | None = None  # (split, plane, exam) from the folder layout
    plane: str = ""
    seg_path: str = ""


@dataclass
class ScanResult:
    manifest: object  # pandas DataFrame, one row per series
    errors: list  # ScanProblem, one per problem
    manifest_path: Path
    errors_path: Path
    archive: Path

    def describe(self) -> str:
        frame = self.manifest
        planes = Counter(frame["plane"]) if len(frame) else Counter()
        lines = [
            f"{self.archive}: {len(frame)} series in {frame['study_id'].nunique() if len(frame) else 0} studies "
            f"of {frame['patient_id'].nunique() if len(frame) else 0} patients "
            f"({', '.join(f'{plane} {planes.get(plane, 0)}' for plane in PLANES)}) -> {self.manifest_path}",
            f"{len(self.errors)} problem(s) -> {self.errors_path}",
        ]
        lines += [f"  {problem.reason}" for problem in self.errors[:5]]
        if len(self.errors) > 5:
            lines.append(f"  ... and {len(self.errors) - 5} more in {self.errors_path.name}")
        if len(frame) and "contrast" in frame.columns:
            lines.append(contrast_table(frame))
        return "\n".join(lines)


def contrast_table(frame) -> str:
    """Series counts, contrast x plane (fat-suppressed ones also counted apart), as text."""
    width = max(len(plane) for plane in PLANES) + 2
    fat = frame["fat_suppressed"] == 1.0
    rows = [("contrast".ljust(12) + "".join(plane.rjust(width) for plane in PLANES) + "total".rjust(width))]
    for name in CONTRASTS:
        for label, mask in ((name, frame["contrast"] == name), (f"  {name} fs", (frame["contrast"] == name) & fat)):
            if label.startswith("  ") and (not mask.any() or name == "stir"):
                continue
            counts = [int((mask & (frame["plane"] == plane)).sum()) for plane in PLANES]
            rows.append(label.ljust(12) + "".join(str(c).rjust(width) for c in counts) + str(sum(counts)).rjust(width))
    return "\n".join(rows)


def default_errors_path(manifest_path: str | Path) -> Path:
    """``runs/manifest.parquet`` -> ``runs/manifest.errors.csv``."""
    return Path(manifest_path).with_suffix(".errors.csv")


def scan_archive(
    archive: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    metadata: str | Path | None = None,
    errors: str | Path | None = None,
    check_voxels: bool = True,
    keep_localizers: bool = False,
    keep_series: str | Path | None = None,
    workers: int | None = None,
    shard: str | tuple | None = None,
) -> ScanResult:
    """Scan ``archive`` and write the manifest ``out`` (.parquet or .csv) and its errors file.

    ``labels`` / ``metadata`` default to labels.csv / metadata.csv in the archive (optional there).
    ``check_voxels`` reads every series once to catch damage that headers do not show (corrupt
    compressed data, NaN/Inf, constant images); False checks headers and file lengths only.
    ``keep_localizers`` keeps series judged localizers or scouts; ``keep_series`` (default:
    keep_series.txt in the archive, optional) lists SeriesInstanceUIDs or archive-relative paths
    kept whatever they are judged. ``workers`` processes read folders (None: every core);
    ``shard`` ("I/N") scans only that part of the archive's top-level folders.
    """
    from ..fileio import write_table
    from .shard_record import shard_record_path, write_shard_record
    from .shards import parse_shard
    from .workers import resolve_workers

    archive = Path(archive).resolve()
    if not archive.is_dir():
        raise OrthodiffError(f"{archive}: archive folder not found; pass the folder that holds the scans")
    workers = resolve_workers(workers)
    shard = None if shard is None else parse_shard(shard)
    out = Path(out).resolve()
    errors_path = Path(errors).resolve() if errors else default_errors_path(out)
    labels_path = _table_path(labels, archive / "labels.csv", "--labels")
    metadata_path = _table_path(metadata, archive / "metadata.csv", "--metadata")
    keep_path = _table_path(keep_series, archive / KEEP_SERIES_NAME, "--keep-series")
    options = ScanOptions(check_voxels, keep_localizers, _read_keep_list(keep_path, archive))
    problems: list[tuple[Path, str]] = []
    archive_info = _archive_info(archive, problems)
    series, segmentations = _discover(archive, options, workers, shard, problems)
    _attach_segmentations(series, segmentations, archive, check_voxels, problems, workers)

    metadata_table, metadata_problems = read_metadata_csv(metadata_path) if metadata_path else (MetadataTable(), [])
    problems += metadata_problems
    label_table = _read_labels(labels_path, archive_info, series, problems)
    frame = _manifest_frame(series, archive, archive_info, metadata_table, label_table, problems)

    errors_list = [ScanProblem(str(path), reason) for path, reason in problems]
    _write_errors(errors_path, errors_list)
    if frame.empty and shard is None:  # an empty shard is written: the merge joins it
        raise OrthodiffError(
            f"{archive}: no readable series found ({len(errors_list)} problem(s) in {errors_path}); "
            "the folder must hold NIfTI, NRRD/MHA, DICOM or MRNet files"
        )
    shard_record_path(out).unlink(missing_ok=True)
    write_table(out, frame)
    write_shard_record(out, archive, shard)
    return ScanResult(manifest=frame, errors=errors_list, manifest_path=out, errors_path=errors_path, archive=archive)


def scan_files(files: list[Path], check_voxels: bool = False) -> tuple[object, list[ScanProblem]]:
    """(manifest rows, problems) of chosen image files of one folder, read as a scan of that folder
    reads them (header, sidecar, checks, plane, study and series ids), the folder's other files aside."""
    folder = files[0].parent
    task = (folder, sorted(path.name for path in files), folder, ScanOptions(check_voxels))
    series, _, problems = _scan_folder(task)
    frame = _manifest_frame(series, folder, {}, MetadataTable(), LabelTable(), problems)
    return frame, [ScanProblem(str(path), reason) for path, reason in problems]


@dataclass(frozen=True)
class ScanOptions:
    """What every folder task needs to judge its series."""

    check_voxels: bool = True
    keep_localizers: bool = False
    keep: frozenset = frozenset()  # SeriesInstanceUIDs and archive-relative paths kept on purpose


def _read_keep_list(path: Path | None, archive: Path) -> frozenset:
    """One SeriesInstanceUID or archive-relative path per line; '#' starts a comment."""
    if path is None:
        return frozenset()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OrthodiffError(f"--keep-series {path}: cannot be read ({exc}); give a text file with one series per line") from exc
    return frozenset(line.split("#", 1)[0].strip().strip("/") for line in lines if line.split("#", 1)[0].strip())


def _archive_info(archive: Path, problems) -> dict:
    """archive.json (joint, label names) when present; a broken one is reported and ignored."""
    from ..fileio import read_json

    path = archive / "archive.json"
    if not path.is_file():
        return {}
    try:
        info = read_json(path)
    except (OSError, ValueError) as exc:
        problems.append((path, f"archive.json: not valid JSON ({exc}); fix it, label names were not checked"))
        return {}
    if not isinstance(info, dict):
        problems.append((path, "archive.json: expected a JSON object; fix it, label names were not checked"))
        return {}
    return info


def _table_path(given, default: Path, option: str) -> Path | None:
    if given is None:
        return default if default.is_file() else None
    path = Path(given).resolve()
    if not path.is_file():
        raise OrthodiffError(f"{option} {path}: file not found; check the path")
    return path


def _write_errors(path: Path, problems: list[ScanProblem]) -> None:
    import pandas as pd

    from ..fileio import write_table

    write_table(path, pd.DataFrame([[p.path, p.reason] for p in problems], columns=ERROR_COLUMNS))


# --- finding series -------------------------------------------------------------------------


def _discover(archive: Path, options: ScanOptions, workers: int, shard, problems) -> tuple[list[FoundSeries], list]:
    """Walk the tree (one shard of it) in sorted order and read its folders on ``workers`` processes.

    Returns the accepted series and (segmentation path, series name) pairs, in walk order.
    """
    from .workers import process_map

    tasks = [(folder, files, archive, options) for folder, files in walk_archive(archive, problems, shard) if files]
    series: list[FoundSeries] = []
    segmentations: list[tuple[Path, str]] = []
    for found, pairs, folder_problems in process_map(_scan_folder, tasks, workers):
        series += found
        segmentations += pairs
        problems += folder_problems
    return series, segmentations


def _scan_folder(task) -> tuple[list[FoundSeries], list, list]:
    """One folder's files -> (accepted series, segmentation pairs, problems). Runs in a worker."""
    folder, filenames, archive, options = task
    problems: list[tuple[Path, str]] = []
    found: list[FoundSeries] = []
    segmentations: list[tuple[Path, str]] = []
    dicom_files = []
    for name in filenames:
        path = folder / name
        suffix = suffix_of(name)
        stem = name[: len(name) - len(suffix)] if suffix else name
        if suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
            base = segmentation_base(stem)
            if base is not None:
                segmentations.append((path, base))
            else:
                _add_image_file(found, path, stem, suffix, archive, problems)
        elif suffix == ".npy":
            _add_mrnet_file(found, path, stem, archive, problems)
        elif suffix in IGNORED_SUFFIXES or name.lower().endswith(".raw.gz") or name.upper() == "DICOMDIR":
            continue
        elif looks_like_dicom(path):
            dicom_files.append(path)
        else:
            reason = _open_problem(path) or "not a recognised scan (NIfTI, NRRD/MHA, DICOM or MRNet .npy); convert or remove it"
            problems.append((path, f"{_rel(path, archive)}: {reason}"))
    if dicom_files:
        _add_dicom_folder(found, folder, dicom_files, archive, problems)
    accepted = [series for series in found if _accept(series, archive, options, problems)]
    for series in accepted:
        if series.dicom is not None:
            series.dicom.tags = {}  # already copied to the series; halves what travels back
    return accepted, segmentations, problems


def _open_problem(path: Path) -> str | None:
    """Why a file cannot be opened for reading (permission, vanished), or None when it can."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return access_problem(exc)
    return None


def segmentation_base(stem: str) -> str | None:
    """``knee_seg`` -> ``knee``: the name of the series a segmentation belongs to, else None."""
    for marker in SEGMENTATION_MARKERS:
        if stem.lower().endswith(marker) and len(stem) > len(marker):
            return stem[: -len(marker)]
    return None


def _add_image_file(found, path: Path, stem: str, suffix: str, archive: Path, problems) -> None:
    try:
        header = read_volume_header(path)
    except ScanError as exc:
        problems.append((path, _relative_reason(str(exc), path, archive)))
        return
    fmt = "nifti" if suffix in NIFTI_SUFFIXES else "itk"
    tags, problem = read_sidecar(path)  # dcm2niix's BIDS sidecar, when present
    if problem:
        problems.append((path, f"{_rel(path.parent, archive)}/{problem}"))
    found.append(
        FoundSeries(
            path=path, format=fmt, shape=header.shape, affine=header.affine, name=stem,
            echo_time=tags.get("echo_time", math.nan), tags=tags,
        )  # fmt: skip
    )


def _add_mrnet_file(found, path: Path, stem: str, archive: Path, problems) -> None:
    split, plane = path.parent.parent.name, path.parent.name
    if split not in MRNET_SPLITS or plane not in PLANES or not stem.isdigit():
        problems.append(
            (path, f"{_rel(path, archive)}: a .npy outside the MRNet layout {{train,valid}}/{{sagittal,coronal,axial}}/NNNN.npy; move it there or convert it to NIfTI")
        )
        return
    try:
        slices, rows, cols = mrnet_shape(path)
    except ScanError as exc:
        problems.append((path, _relative_reason(str(exc), path, archive)))
        return
    shape = (cols, rows, slices)
    found.append(
        FoundSeries(path=path, format="mrnet", shape=shape, affine=mrnet_affine(plane, shape), name=stem, mrnet=(split, plane, stem))
    )


def _add_dicom_folder(found, folder: Path, files, archive: Path, problems) -> None:
    volumes, dicom_problems = index_dicom_files(files)
    problems += [(path, _relative_reason(reason, path, archive)) for path, reason in dicom_problems]
    for volume in volumes:
        found.append(
            FoundSeries(
                path=folder,
                format="dicom",
                shape=volume.shape,
                affine=volume.affine,
                name=folder.name,
                series_uid=volume.series_uid,
                echo_index=volume.echo_index,
                echo_rank=volume.echo_rank,
                echo_time=volume.echo_time,
                tags=volume.tags,
                dicom=volume,
            )
        )


# --- checking series ------------------------------------------------------------------------


def _accept(series: FoundSeries, archive: Path, options: ScanOptions, problems) -> bool:
    """Plane from geometry and the checks that make a series usable; False (and a problem) if not."""
    where = _series_label(series, archive)
    reason = _shape_problem(series.shape)
    if reason is None:
        try:
            series.plane = plane_from_affine(series.affine)
        except ValueError:
            reason = "its affine is degenerate (in-plane axes parallel); fix the file's geometry"
    if reason is None and series.mrnet is not None and series.plane != series.mrnet[1]:
        reason = f"MRNet geometry gives {series.plane}, folder says {series.mrnet[1]}"  # guards mrnet_affine
    if reason is None and series.mrnet is None:
        reason = _not_diagnostic(series, archive, options)
    if reason is None and options.check_voxels:
        try:
            reason = voxel_problem(_load(series).array)
        except ScanError as exc:
            reason = _strip_path(str(exc), series.path)
    if reason is not None:
        problems.append((series.path, f"{where}: {reason}"))
        return False
    return True


def _not_diagnostic(series: FoundSeries, archive: Path, options: ScanOptions) -> str | None:
    """Why a series is a localizer or a derived image (unless kept on purpose), else None."""
    keys = {series.series_uid, _rel(series.path, archive)} - {""}
    if keys & options.keep:
        return None
    volume = series.dicom
    image_type = volume.image_type if volume is not None else series.tags.get("image_type", ())
    description = " ".join(str(series.tags.get(key) or "") for key in ("series_description", "protocol_name"))
    derived = derived_reason(image_type, volume.sop_class if volume is not None else "", description)
    if derived:
        return f"{derived}; skipped, only acquired volumes are used (list it in {KEEP_SERIES_NAME} to keep it)"
    step = float(np.linalg.norm(series.affine[:3, 2]))
    localizer = localizer_reason(image_type, description, int(series.shape[2]), step, volume.part_count if volume else 1)
    if localizer and not options.keep_localizers:
        return f"{localizer}; skipped, not a diagnostic volume (scan with --keep-localizers to keep it)"
    return None


def _shape_problem(shape: tuple) -> str | None:
    if len(shape) < 3 or shape[2] < 3:
        return f"a 2D image or localizer (shape {tuple(shape)}, fewer than 3 slices); skipped, a series needs at least 3 slices"
    if len(shape) > 3:
        return f"a {len(shape)}D image (shape {tuple(shape)}); split it into 3D volumes, one per file"
    if min(shape) < 1:
        return f"an empty image (shape {tuple(shape)}); remove it"
    return None


def voxel_problem(array: np.ndarray) -> str | None:
    """Why the voxels are unusable (NaN/Inf, constant), or None."""
    finite = np.isfinite(array)
    if not finite.all():
        return f"{int(array.size - finite.sum())} NaN/Inf voxels; fix or re-export the image"
    if array.size and float(array.min()) == float(array.max()):
        return f"a constant image (every voxel {float(array.min()):g}); re-export it or remove it"
    return None


def _load(series: FoundSeries):
    if series.format == "dicom":
        return read_dicom_volume(series.dicom)
    if series.format == "mrnet":
        return read_mrnet(series.path, series.mrnet[1])
    return read_volume(series.path)


def _attach_segmentations(series: list[FoundSeries], segmentations, archive: Path, check_voxels: bool, problems, workers: int = 1) -> None:
    """A ``<name>_seg`` file labels every series named ``<name>`` in the same folder."""
    from .workers import process_map

    by_key: dict[tuple, list[FoundSeries]] = defaultdict(list)
    for item in series:
        if item.format != "mrnet":
            by_key[(item.path.parent, item.name)].append(item)
    claimed: dict[tuple, Path] = {}
    pairs = sorted(segmentations)
    checks = [
        (path, by_key[(path.parent, base)][0].shape, by_key[(path.parent, base)][0].affine, check_voxels)
        for path, base in pairs
        if by_key.get((path.parent, base))
    ]
    reasons = dict(zip([check[0] for check in checks], process_map(_segmentation_problem_task, checks, workers)))
    for path, base in pairs:
        key = (path.parent, base)
        targets = by_key.get(key, [])
        if not targets:
            problems.append(
                (path, f"{_rel(path, archive)}: segmentation without a series named {base!r} beside it; add the image or rename the file")
            )
            continue
        if key in claimed:
            problems.append((path, f"{_rel(path, archive)}: second segmentation of {base!r} (kept {claimed[key].name}); remove one"))
            continue
        reason = reasons.get(path)
        if reason:
            problems.append((path, f"{_rel(path, archive)}: {reason}"))
            continue
        claimed[key] = path
        for target in targets:
            target.seg_path = str(path)


def _segmentation_problem_task(task) -> str | None:
    path, shape, affine, check_voxels = task
    return _segmentation_problem(path, shape, affine, check_voxels)


def _segmentation_problem(path: Path, shape: tuple, affine: np.ndarray, check_voxels: bool) -> str | None:
    try:
        header = read_volume_header(path)
        if check_voxels:
            array = read_volume(path).array
            if not np.isfinite(array).all():
                return "segmentation has NaN/Inf voxels; fix it"
    except ScanError as exc:
        return _strip_path(str(exc), path)
    if tuple(header.shape) != tuple(shape):
        return f"segmentation shape {tuple(header.shape)} differs from its series {tuple(shape)}; resample it onto the series grid"
    tolerance = 0.05 * float(np.min(np.linalg.norm(affine[:3, :3], axis=0)))
    if not np.allclose(header.affine, affine, atol=tolerance):
        return "segmentation affine differs from its series (another grid or orientation); resample it onto the series grid"
    return None


# --- studies, labels, metadata, the table ---------------------------------------------------


def _read_labels(labels_path, archive_info: dict, series: list[FoundSeries], problems) -> LabelTable:
    known = list(archive_info["labels"]) if isinstance(archive_info.get("labels"), list) else None
    tables = []
    if labels_path is not None:
        table, label_problems = read_labels_csv(labels_path, known)
        problems += label_problems
        tables.append(table)
    exams_by_root: dict[Path, dict] = defaultdict(dict)
    for item in series:
        if item.mrnet is not None:
            split, _, exam = item.mrnet
            exams_by_root[item.path.parent.parent.parent][(split, int(exam))] = mrnet_study_id(split, exam)
    for root, exams in sorted(exams_by_root.items()):
        table, label_problems = read_mrnet_labels(root, exams)
        problems += label_problems
        tables.append(table)
    return merge_labels(tables)


def mrnet_study_id(split: str, exam: str) -> str:
    return f"mrnet-{split}-{exam}"


def _study_ids(series: list[FoundSeries], archive: Path) -> tuple[list[str], list[str]]:
    """Study of each series: MRNet exam, DICOM StudyInstanceUID (named by its StudyID), DICOM
    StudyID with its patient and exam folder, else the parent folder.

    A short name (StudyID, folder name) shared by different studies falls back to the long one
    (StudyInstanceUID, folder path in the archive), so two patients' "visit1" never merge.
    Returns (study ids, long ids); the long ids (``study_key``) let shards be merged the same way.
    """
    exam_folders = _exam_folders(series, archive)
    keys, short, long = [], {}, {}
    for item in series:
        if item.mrnet is not None:
            split, _, exam = item.mrnet
            key = ("mrnet", mrnet_study_id(split, exam))
            short[key] = long[key] = key[1]
        elif item.tags.get("study_uid"):
            uid = item.tags["study_uid"]
            key = ("dicom", uid)
            short[key], long[key] = item.tags.get("study_id") or uid, uid
        elif item.tags.get("study_id"):
            # StudyID is a scanner's counter, not an identity: without a StudyInstanceUID it names
            # a study only together with its patient and its exam folder
            exam, study_id = exam_folders[id(item)], item.tags["study_id"]
            key = ("dicom-id", item.tags.get("patient_id", ""), str(exam), study_id)
            short[key], long[key] = study_id, f"{_folder_name(exam, archive)}/{study_id}"
        else:
            folder = item.path.parent
            key = ("folder", str(folder))
            short[key] = folder.name
            long[key] = _folder_name(folder, archive)
        keys.append(key)
    _name_patients_sharing_an_exam_folder(long)
    owners = defaultdict(set)
    for key in set(keys):
        owners[short[key]].add(key)
    ids = [short[key] if len(owners[short[key]]) == 1 else long[key] for key in keys]
    return ids, [f"{key[0]}:{long[key]}" for key in keys]


def _exam_folders(series: list[FoundSeries], archive: Path) -> dict[int, Path]:
    """The exam folder of each DICOM series (by ``id``): its own folder when that holds several
    series (all of an exam's files together) or is the archive, else the folder above it (one
    folder per series)."""
    uids_in = defaultdict(set)
    for item in series:
        if item.format == "dicom":
            uids_in[item.path].add(item.series_uid)
    return {id(item): item.path if len(uids_in[item.path]) > 1 or item.path == archive else item.path.parent
            for item in series if item.format == "dicom"}


def _folder_name(folder: Path, archive: Path) -> str:
    return folder.relative_to(archive).as_posix() if folder != archive else archive.name


def _name_patients_sharing_an_exam_folder(long: dict) -> None:
    """Two patients' StudyID-only studies in one exam folder: their long ids also name the patient."""
    owners = defaultdict(list)
    for key, name in long.items():
        if key[0] == "dicom-id":
            owners[name].append(key)
    for keys in owners.values():
        for key in keys if len(keys) > 1 else []:
            _, patient, _, study_id = key
            long[key] = f"{long[key].rsplit('/', 1)[0]}/{patient or 'no-patient'}/{study_id}"


def _series_ids(series: list[FoundSeries], studies: list[str]) -> list[str]:
    """``<study>/<plane>`` (+ ``/echoN``); clashes get the file or folder name, then a number."""
    bases = [
        f"{study}/{item.plane}" + (f"/echo{item.echo_rank + 1}" if item.echo_rank >= 0 else "")
        for item, study in zip(series, studies)
    ]
    counts = Counter(bases)
    ids = []
    for item, base in zip(series, bases):
        if counts[base] > 1:
            name = item.name
            if item.format == "dicom":
                name += f"-s{item.tags.get('series_number') or item.series_uid[-6:]}"
            base = f"{base}/{name}"
        ids.append(base)
    seen: Counter = Counter()
    unique = []
    for series_id in ids:
        seen[series_id] += 1
        unique.append(series_id if seen[series_id] == 1 else f"{series_id}-{seen[series_id]}")
    return unique


def _metadata_fields(item: FoundSeries, row: dict | None, archive_info: dict) -> dict:
    """Metadata from metadata.csv first, then DICOM tags, then archive.json (joint)."""
    tags = item.tags
    height_m = tags.get("height_m", math.nan)
    weight = tags.get("weight", math.nan)
    from_tags = {
        "joint": tags.get("body_part", "") or ("knee" if item.format == "mrnet" else ""),
        "site": tags.get("site", ""),
        "field_strength": field_strength_tesla(tags.get("field_strength", math.nan)),
        "age": dicom_age_years(tags.get("age", "")),
        "sex": normalise_sex(tags.get("sex", "")),
        "height": height_m * 100.0 if np.isfinite(height_m) and height_m > 0 else math.nan,
        "weight": weight if np.isfinite(weight) and weight > 0 else math.nan,  # 0 means "not recorded"
    }
    if archive_info.get("joint"):
        from_tags["joint"] = str(archive_info["joint"])
    fields = {}
    for name in METADATA_FIELDS:
        value = row.get(name) if row else None
        known = value not in (None, "") and not (isinstance(value, float) and math.isnan(value))
        fields[name] = value if known else from_tags[name]
    if row and row.get("sex_conflict"):
        fields["sex"] = ""
    return fields


def _manifest_frame(series, archive: Path, archive_info: dict, metadata: MetadataTable, labels: LabelTable, problems):
    import pandas as pd

    series = sorted(series, key=lambda s: (str(s.path), s.series_uid, s.echo_index))
    studies, study_keys = _study_ids(series, archive)
    series_ids = _series_ids(series, studies)
    records = []
    for item, study, series_id, study_key in zip(series, studies, series_ids, study_keys):
        row = metadata.rows.get(study)
        # an MRNet exam (no tags) is its own patient unless metadata.csv names the patient
        patient = (row or {}).get("patient_id") or item.tags.get("patient_id") or study
        spacing = np.linalg.norm(item.affine[:3, :3], axis=0)
        normal = _slice_normal(item.affine)
        record = {
            "patient_id": patient,
            "study_id": study,
            "series_id": series_id,
            "plane": item.plane,
            "path": str(item.path),
            "format": item.format,
            "series_uid": item.series_uid,
            "echo_index": int(item.echo_index),
            "echo_time": float(item.echo_time),
            "n_slices": int(item.shape[2]),
            "rows": int(item.shape[1]),
            "cols": int(item.shape[0]),
            "spacing_slice": float(spacing[2]),
            "spacing_row": float(spacing[1]),
            "spacing_col": float(spacing[0]),
            "normal_x": float(normal[0]),
            "normal_y": float(normal[1]),
            "normal_z": float(normal[2]),
            "seg_path": item.seg_path,
        }
        record.update(_metadata_fields(item, row, archive_info))
        record.update(sequence_fields(item.tags, item.echo_time))
        record["study_key"] = study_key
        for name in metadata.extra_columns:
            if name not in record:
                record[name] = (row or {}).get(name, "")
        study_labels = labels.values.get(study, {})
        for name in labels.names:
            record[LABEL_PREFIX + name] = float(study_labels.get(name, math.nan))
        records.append(record)

    found_studies = set(studies)
    for table in (labels, metadata):
        rows = table.values if isinstance(table, LabelTable) else table.rows
        for study in sorted(set(rows) - found_studies):
            path, where = table.sources[study]
            problems.append((path, f"{where}: study {study!r} has no series in the archive; fix the study id or delete the row"))

    extra = [name for name in metadata.extra_columns if name not in MANIFEST_COLUMNS]
    columns = MANIFEST_COLUMNS + extra + [LABEL_PREFIX + name for name in labels.names]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for column in INT_COLUMNS:
        frame[column] = frame[column].astype("int64")
    numeric = ("echo_time", "field_strength", "age", "height", "weight") + FLOAT_COLUMNS
    for column in numeric + tuple(LABEL_PREFIX + n for n in labels.names):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in TEXT_COLUMNS + ("study_key",):
        frame[column] = frame[column].fillna("").astype(str)
    plane_rank = frame["plane"].map({plane: rank for rank, plane in enumerate(PLANES)})
    order = frame.assign(_plane=plane_rank).sort_values(["patient_id", "study_id", "_plane", "series_id"], kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def _slice_normal(affine: np.ndarray) -> np.ndarray:
    """Unit RAS normal of the slice planes, pointing the way the slice index grows."""
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    return -normal if np.dot(normal, affine[:3, 2]) < 0 else normal


def _series_label(series: FoundSeries, archive: Path) -> str:
    label = _rel(series.path, archive)
    if series.format == "dicom":
        part = series.dicom.part_label if series.dicom is not None else ""
        label += f" (series {series.series_uid}" + (f", {part}" if part else "") + ")"
    return label


def _rel(path: Path, archive: Path) -> str:
    try:
        return Path(path).relative_to(archive).as_posix() or "."
    except ValueError:
        return str(path)


def _strip_path(message: str, path: Path) -> str:
    """Reader messages start with the path; the caller names the file already."""
    for prefix in (f"{path}: ", f"{path.name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _relative_reason(message: str, path: Path, archive: Path) -> str:
    """Start a reader's message with the file's path inside the archive instead of its name."""
    for prefix in (str(path), path.name):
        if message.startswith(prefix):
            return _rel(path, archive) + message[len(prefix):]
    return f"{_rel(path, archive)}: {message}"
