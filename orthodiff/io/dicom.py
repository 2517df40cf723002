"""DICOM folders: index files into 3D volumes (one per series, echo and contrast) and read them.

A folder may hold several series (grouped by SeriesInstanceUID), and one series may hold several
echoes or contrasts (a multi-echo T2 map stores 8 echoes under one UID). Each of those becomes
its own volume: split by slice orientation first (a three-plane localizer holds three stacks),
then by EchoTime, else EchoNumbers, else by repeated slice positions. Whether a volume is
diagnostic (localizer, derived image) is judged by the scan, not here, so a series kept on
purpose can still be read.

Compressed transfer syntaxes (JPEG, JPEG Lossless, JPEG-LS, JPEG 2000, RLE) are decoded by
pydicom's pixel handlers through the pylibjpeg plugins and pyjpegls, which are dependencies.

Geometry: voxel axis i runs along the DICOM row cosine (across columns, spacing PixelSpacing[1]),
j along the column cosine (across rows, PixelSpacing[0]), k across slices, sorted by position
along the slice normal ``row_cosine x column_cosine``. The affine maps (i, j, k) to RAS mm
(DICOM patient coordinates are LPS; x and y flip sign), as dcm2niix writes NIfTI.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScanError
from .access import access_problem
from .volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Without the 'DICM' preamble, only files with these suffixes are tried as raw DICOM.
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
_POSITION_DECIMALS = 3  # slice positions equal to 1 micrometre are the same position
_SPACING_TOLERANCE = 0.1  # slice steps may differ by 10 % before the series counts as gapped
_COSINE_TOLERANCE = 2e-3  # direction cosines this close are one orientation (about 0.1 degree)
_PIXEL_SPACING_TOLERANCE = 1e-3  # mm; PixelSpacing differing by more splits nothing: it is refused


@dataclass
class SliceHeader:
    """What one DICOM file says about its place in a volume (read without pixel data)."""

    path: Path
    series_uid: str
    orientation: tuple  # six direction cosines, LPS
    position: np.ndarray  # ImagePositionPatient, LPS mm
    pixel_spacing: tuple  # (row spacing, column spacing) mm
    rows: int
    cols: int
    echo_time: float
    echo_number: int
    instance_number: int
    image_type: tuple  # ImageType values, upper case
    sop_class: str
    tags: dict = field(default_factory=dict)  # patient / study / site tags for the manifest
    damage: str = ""  # why the pixel data is unusable (truncated), "" when it looks whole


@dataclass
class DicomVolume:
    """One 3D volume of a DICOM series: its files in slice order and its voxel->RAS affine."""

    folder: Path
    series_uid: str
    echo_index: int  # 0-based rank among the series' volumes; -1 when the series is one volume
    echo_time: float
    files: list
    affine: np.ndarray
    rows: int
    cols: int
    tags: dict
    part_index: int = -1  # rank of its slice orientation when the series mixes several, else -1
    part_count: int = 1  # how many slice orientations the series holds
    echo_rank: int = -1  # rank among the echoes / contrasts of its orientation, -1 when alone
    image_type: tuple = ()
    sop_class: str = ""

    @property
    def shape(self) -> tuple:
        return (self.cols, self.rows, len(self.files))

    @property
    def part_label(self) -> str:
        """"orientation 2 of 3, echo 2" style words naming the volume inside its series."""
        words = []
        if self.part_index >= 0:
            words.append(f"orientation {self.part_index + 1} of {self.part_count}")
        if self.echo_rank >= 0:
            words.append(f"echo {self.echo_rank + 1}")
        return ", ".join(words)

    @property
    def label(self) -> str:
        part = f", {self.part_label}" if self.part_label else ""
        return f"{self.folder} (series {self.series_uid}{part})"


def has_dicom_preamble(path: str | Path) -> bool:
    """True when the file carries the DICOM part-10 marker 'DICM' after its 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def looks_like_dicom(path: str | Path) -> bool:
    """Preamble check, else (for suffix-less or .dcm files) a header parse without pixel data."""
    path = Path(path)
    if has_dicom_preamble(path):
        return True
    if path.suffix.lower() not in DICOM_SUFFIXES:
        return False
    import pydicom

    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:
        return False
    # force=True parses almost anything; a real image header has these.
    return "SOPClassUID" in dataset or ("Rows" in dataset and "Columns" in dataset)


def read_slice_header(path: str | Path, tagged_series: set | None = None) -> SliceHeader | None:
    """Header of one file, or None for a DICOM object that is not an image (reports, DICOMDIR).

    The manifest's patient, study and sequence tags are read only for the first file of each
    series when ``tagged_series`` (the series already tagged, updated here) is given: they are
    the same on every slice, and converting them is most of the cost of a header.

    Raises ScanError for a file that cannot be parsed. Pixel data cut short is caught without
    decoding it (the bytes after the header are compared with Rows x Columns x bits) and noted in
    ``damage``, so the volume it belongs to can be rejected while its siblings are kept.
    """
    import pydicom

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            dataset = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
            pixel_offset = handle.tell()
    except OSError as exc:
        raise ScanError(f"{path.name}: {access_problem(exc)}") from exc
    except Exception as exc:
        raise ScanError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc}); re-export it or remove it") from exc
    if "Rows" not in dataset or "Columns" not in dataset:
        return None
    if int(_float(_text(dataset, "NumberOfFrames"), default=1)) > 1:
        raise ScanError(
            f"{path.name}: enhanced multi-frame DICOM is not supported; convert the series with dcm2niix to NIfTI"
        )
    damage = _pixel_bytes_problem(path, dataset, pixel_offset)
    try:
        geometry = {key: _numbers(dataset, key) for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")}
    except ScanError as exc:
        raise ScanError(f"{path.name}: {exc}") from exc
    missing = [key for key, values in geometry.items() if values is None]
    if missing:
        raise ScanError(f"{path.name}: DICOM image lacks {', '.join(missing)}; it has no 3D geometry, convert or remove it")
    wrong = [key for key, size in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)) if len(geometry[key]) != size]
    if wrong:
        raise ScanError(f"{path.name}: {wrong[0]} holds {len(geometry[wrong[0]])} numbers; the geometry is broken, re-export the file")
    return SliceHeader(
        path=path,
        series_uid=_text(dataset, "SeriesInstanceUID") or "",
        orientation=tuple(geometry["ImageOrientationPatient"]),
        position=np.asarray(geometry["ImagePositionPatient"]),
        pixel_spacing=tuple(geometry["PixelSpacing"]),
        rows=_uint(dataset, "Rows"),
        cols=_uint(dataset, "Columns"),
        echo_time=_float(_text(dataset, "EchoTime")),
        echo_number=int(_float((_text(dataset, "EchoNumbers") or "").split("\\")[0], default=0)),
        instance_number=int(_float(_text(dataset, "InstanceNumber"), default=0)),
        image_type=tuple(value.strip().upper() for value in (_text(dataset, "ImageType") or "").split("\\") if value.strip()),
        sop_class=_text(dataset, "SOPClassUID") or "",
        tags=_series_tags(dataset, tagged_series),
        damage=damage,
    )


@functools.lru_cache(maxsize=None)
def _tag(keyword: str):
    from pydicom.tag import Tag

    return Tag(keyword)


def _text(dataset, keyword: str) -> str | None:
    """A text-valued element (DS, IS, CS, UI) as stored, values joined by backslashes; None if absent.

    Read from the raw bytes: pydicom's conversion into DSfloat / IS objects is half the cost of a
    header, and every slice of an archive pays it.
    """
    tag = _tag(keyword)
    if tag not in dataset:
        return None
    element = dataset.get_item(tag)
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1").strip(" \x00")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(item) for item in value)
    return str(value).strip()


def _uint(dataset, keyword: str) -> int:
    """A US element (Rows, Columns, BitsAllocated ...) from its stored bytes; 0 when absent or empty."""
    tag = _tag(keyword)
    if tag not in dataset:
        return 0
    element = dataset.get_item(tag)
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        little = getattr(element, "is_little_endian", True)
        return int.from_bytes(value[:2], "little" if little is not False else "big") if len(value) >= 2 else 0
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _numbers(dataset, keyword: str) -> list[float] | None:
    """A DS element's numbers; None when absent or empty, ScanError when not numbers."""
    text = _text(dataset, keyword)
    if not text:
        return None
    try:
        return [float(value) for value in text.split("\\")]
    except ValueError as exc:
        raise ScanError(f"{keyword} {text!r} is not a list of numbers; the file's geometry is broken, re-export it") from exc


def _pixel_bytes_problem(path: Path, dataset, pixel_offset: int) -> str:
    """A reason when an uncompressed file holds fewer pixel bytes than its header promises, else ""."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        return ""  # encapsulated frames have no fixed size; decoding them catches damage
    expected = (
        _uint(dataset, "Rows")
        * _uint(dataset, "Columns")
        * (_uint(dataset, "SamplesPerPixel") or 1)
        * (_uint(dataset, "BitsAllocated") or 16)
        // 8
    )
    implicit = syntax is not None and syntax.is_implicit_VR
    element_header = 8 if implicit else 12
    available = os.path.getsize(path) - pixel_offset - element_header
    if available < expected:
        return (
            f"{path.name}: DICOM pixel data is truncated ({max(available, 0)} of {expected} bytes); "
            "copy the file again from the source"
        )
    return ""


def _float(value, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _series_tags(dataset, tagged_series: set | None) -> dict:
    if tagged_series is None:
        return _manifest_tags(dataset)
    series_uid = _text(dataset, "SeriesInstanceUID") or ""
    if series_uid in tagged_series:
        return {}
    tagged_series.add(series_uid)
    return _manifest_tags(dataset)


def _manifest_tags(dataset) -> dict:
    """Patient, study and acquisition tags the manifest can use (empty strings when absent)."""

    def text(keyword: str) -> str:
        return str(dataset.get(keyword, "") or "").strip()

    return {
        "patient_id": text("PatientID"),
        "study_id": text("StudyID"),
        "study_uid": text("StudyInstanceUID"),
        "sex": text("PatientSex").upper(),
        "age": text("PatientAge"),
        "height_m": _float(dataset.get("PatientSize")),
        "weight": _float(dataset.get("PatientWeight")),
        "site": text("InstitutionName"),
        "field_strength": _float(dataset.get("MagneticFieldStrength")),
        "body_part": text("BodyPartExamined").lower(),
        "series_number": text("SeriesNumber"),
        # what tells sequences apart (orthodiff.data.sequence turns these into manifest columns)
        "series_description": text("SeriesDescription"),
        "protocol_name": text("ProtocolName"),
        "manufacturer": text("Manufacturer"),
        "manufacturer_model": text("ManufacturerModelName"),
        "repetition_time": _float(dataset.get("RepetitionTime")),
        "inversion_time": _float(dataset.get("InversionTime")),
        "flip_angle": _float(dataset.get("FlipAngle")),
        "scanning_sequence": _multi_text(dataset.get("ScanningSequence")),
        "sequence_variant": _multi_text(dataset.get("SequenceVariant")),
        "acquisition_type": text("MRAcquisitionType").upper(),
        "scan_options": _multi_text(dataset.get("ScanOptions")) if "ScanOptions" in dataset else None,
    }


def _multi_text(value) -> str:
    """A multi-valued string tag as DICOM writes it, values joined by backslashes."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(item).strip() for item in value)
    return str(value).strip()


def index_dicom_files(paths) -> tuple[list[DicomVolume], list[tuple[Path, str]]]:
    """Group DICOM files into volumes. Returns (volumes, problems as (path, reason)).

    A damaged file is reported and removes only the volume it belongs to; a file whose header
    cannot be read at all is reported alone (the volume it belonged to then shows a gap, also
    reported). A series holding several slice orientations becomes one volume per orientation
    (``part_index``); slices that disagree only slightly in orientation are refused.
    """
    problems: list[tuple[Path, str]] = []
    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    tagged: set = set()
    for path in sorted(Path(p) for p in paths):
        try:
            header = read_slice_header(path, tagged)
        except ScanError as exc:
            problems.append((path, str(exc)))
            continue
        if header is None:
            continue
        if header.damage:
            problems.append((path, header.damage))
        by_series[header.series_uid].append(header)

    volumes: list[DicomVolume] = []
    for series_uid in sorted(by_series):
        headers = by_series[series_uid]
        folder = headers[0].path.parent
        series_tags = next((h.tags for h in headers if h.tags), {})
        for header in headers:
            header.tags = series_tags
        parts, refused = _split_orientations(headers)
        for group in refused:
            problems.append((folder, f"{folder.name} (series {series_uid}): {len(group)} slice(s) lie at a slightly different "
                             "orientation from the rest of their plane; the slices disagree in orientation, re-export the series"))
        ranked = [(part, echo, group) for part, part_headers in enumerate(parts) for echo, group in enumerate(_split_echoes(part_headers))]
        echoes_per_part = defaultdict(int)
        for part, _, _ in ranked:
            echoes_per_part[part] += 1
        for rank, (part, echo, group) in enumerate(ranked):
            volume_index = rank if len(ranked) > 1 else -1
            part_index = part if len(parts) > 1 else -1
            echo_rank = echo if echoes_per_part[part] > 1 else -1
            try:
                volume = _volume_from_headers(folder, series_uid, volume_index, group, part_index, len(parts), echo_rank)
            except ScanError as exc:
                problems.append((folder, str(exc)))
                continue
            volumes.append(volume)
    return volumes, problems


def _split_orientations(headers: list[SliceHeader]) -> tuple[list[list[SliceHeader]], list[list[SliceHeader]]]:
    """Cluster slices by orientation. Returns (parts, refused).

    Parts are ordered by plane (sagittal, coronal, axial). Two clusters of the same plane are
    not a localizer's planes but slices that disagree: the smaller ones are refused.
    """
    from ..planes import PLANES

    clusters: list[list[SliceHeader]] = []
    for header in sorted(headers, key=lambda h: (h.instance_number, str(h.path))):
        for cluster in clusters:
            if np.max(np.abs(np.subtract(cluster[0].orientation, header.orientation))) <= _COSINE_TOLERANCE:
                cluster.append(header)
                break
        else:
            clusters.append([header])
    if len(clusters) == 1:
        return clusters, []
    by_plane: dict[str, list[list[SliceHeader]]] = defaultdict(list)
    for cluster in clusters:
        by_plane[_plane_of(cluster[0].orientation)].append(cluster)
    parts, refused = [], []
    for plane in sorted(by_plane, key=lambda p: PLANES.index(p) if p in PLANES else len(PLANES)):
        ranked = sorted(by_plane[plane], key=len, reverse=True)
        parts.append(ranked[0])
        refused += ranked[1:]
    return parts, refused


def _plane_of(orientation: tuple) -> str:
    from ..planes import plane_from_normal, slice_normal

    try:
        return plane_from_normal(slice_normal(orientation[:3], orientation[3:]))
    except ValueError:
        return "degenerate"  # refused later with its own reason


def _split_echoes(headers: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Split one orientation of a series into volumes: by echo time / number, then repeats.

    Volumes come out ordered by echo time (then echo number, then acquisition order).
    """
    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    echo_times = {round(h.echo_time, 3) for h in headers if np.isfinite(h.echo_time)}
    echo_numbers = {h.echo_number for h in headers}
    for header in headers:
        if len(echo_times) > 1:
            echo_key = (round(header.echo_time, 3) if np.isfinite(header.echo_time) else np.inf, 0)
        elif len(echo_numbers) > 1:
            echo_key = (0.0, header.echo_number)
        else:
            echo_key = (0.0, 0)
        groups[echo_key].append(header)

    volumes: list[list[SliceHeader]] = []
    for key in sorted(groups):
        volumes.extend(_split_repeated_positions(groups[key]))
    return volumes


def _split_repeated_positions(headers: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Several contrasts under one echo key repeat each slice position: the n-th repeat in
    instance order goes to volume n. When only a few positions repeat, those are duplicated
    files, not contrasts: the group stays whole and the volume check names the duplicates."""
    by_position: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for header in sorted(headers, key=lambda h: (h.instance_number, str(h.path))):
        by_position[_position_key(header)].append(header)
    counts = [len(group) for group in by_position.values()]
    repeats = max(counts)
    if repeats == 1 or sum(count == repeats for count in counts) * 2 < len(counts):
        return [headers]
    return [[group[n] for group in by_position.values() if len(group) > n] for n in range(repeats)]


def _position_key(header: SliceHeader) -> tuple:
    return tuple(np.round(header.position, _POSITION_DECIMALS))


def _volume_from_headers(
    folder: Path, series_uid: str, echo_index: int, headers, part_index: int = -1, part_count: int = 1, echo_rank: int = -1
) -> DicomVolume:
    first = headers[0]
    words = [f"orientation {part_index + 1} of {part_count}"] if part_index >= 0 else []
    words += [f"echo {echo_rank + 1}"] if echo_rank >= 0 else []
    where = f"{folder.name} (series {series_uid}" + "".join(f", {word}" for word in words) + ")"
    damaged = [h.path.name for h in headers if h.damage]
    if damaged:
        raise ScanError(f"{where}: skipped because file(s) {', '.join(damaged[:3])} are damaged; re-export the series")
    duplicates = _duplicated_slices(headers)
    if duplicates:
        raise ScanError(
            f"{where}: duplicated slice, files {' and '.join(duplicates)} share one position and echo; "
            "remove the extra copy and scan again"
        )
    if {(h.rows, h.cols) for h in headers} != {(first.rows, first.cols)}:
        raise ScanError(f"{where}: slices differ in matrix size; the series is not one volume, split or remove it")
    bad_spacing = _spacing_problem(headers)
    if bad_spacing:
        raise ScanError(f"{where}: {bad_spacing}; the geometry is broken (read as it is, the image would be mirrored "
                        "or flat), re-export the series or correct the tag")
    spacings = np.asarray([h.pixel_spacing for h in headers], float)
    if np.ptp(spacings, axis=0).max() > _PIXEL_SPACING_TOLERANCE:
        odd = next(h for h in headers if np.abs(np.subtract(h.pixel_spacing, first.pixel_spacing)).max() > _PIXEL_SPACING_TOLERANCE)
        raise ScanError(
            f"{where}: slices differ in PixelSpacing ({first.path.name} {_mm(first.pixel_spacing)}, "
            f"{odd.path.name} {_mm(odd.pixel_spacing)}); the series is not one volume, re-export it"
        )
    if len(headers) < 3:
        raise ScanError(f"{where}: only {len(headers)} slice(s), a 2D image; a 3D series needs at least 3 slices")
    row_cosine = np.asarray(first.orientation[:3], float)
    column_cosine = np.asarray(first.orientation[3:], float)
    if min(np.linalg.norm(row_cosine), np.linalg.norm(column_cosine)) < 1e-3:
        raise ScanError(f"{where}: ImageOrientationPatient has a zero direction cosine; the geometry is broken")
    row_cosine /= np.linalg.norm(row_cosine)
    column_cosine /= np.linalg.norm(column_cosine)
    normal = np.cross(row_cosine, column_cosine)
    if np.linalg.norm(normal) < 1e-3:
        raise ScanError(f"{where}: ImageOrientationPatient cosines are parallel; the geometry is broken")
    normal /= np.linalg.norm(normal)
    ordered = sorted(headers, key=lambda h: float(np.dot(normal, h.position)))
    depths = np.array([float(np.dot(normal, h.position)) for h in ordered])
    steps = np.diff(depths)
    step = float(np.median(steps))
    if step < 1e-3:
        raise ScanError(f"{where}: several slices share one position; the series mixes volumes that could not be separated")
    if np.max(np.abs(steps - step)) > _SPACING_TOLERANCE * step:
        raise ScanError(
            f"{where}: slice positions are unevenly spaced (steps {steps.min():.2f}-{steps.max():.2f} mm), "
            "slices are missing; re-export the complete series"
        )
    # The slice vector from first to last position keeps any gantry-tilt shear exact.
    slice_vector = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
    row_spacing, column_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing
    lps[:3, 1] = column_cosine * row_spacing
    lps[:3, 2] = slice_vector
    lps[:3, 3] = ordered[0].position
    affine = np.eye(4)
    affine[:3, :] = LPS_TO_RAS @ lps[:3, :]
    return DicomVolume(
        folder=folder,
        series_uid=series_uid,
        echo_index=echo_index,
        echo_time=first.echo_time,
        files=[h.path for h in ordered],
        affine=affine,
        rows=first.rows,
        cols=first.cols,
        tags=dict(first.tags),
        part_index=part_index,
        part_count=part_count,
        echo_rank=echo_rank,
        image_type=first.image_type,
        sop_class=first.sop_class,
    )


def _spacing_problem(headers) -> str:
    """The first PixelSpacing that is not two positive finite numbers of mm (a negative one turns the
    affine around), named with its file; else "". SliceThickness and SpacingBetweenSlices are not
    checked: the slice axis comes from the slices' positions, and some scanners write a negative
    SpacingBetweenSlices for a sound series."""
    for header in headers:
        if any(not np.isfinite(value) or value <= 0 for value in header.pixel_spacing):
            shown = "\\".join(f"{float(value):g}" for value in header.pixel_spacing)
            return f"PixelSpacing {shown} in {header.path.name} is not a positive number of mm"
    return ""


def _duplicated_slices(headers) -> list[str]:
    """File names of the first slice position that occurs more than once, else []."""
    by_position: dict[tuple, list[str]] = defaultdict(list)
    for header in headers:
        by_position[_position_key(header)].append(header.path.name)
    repeated = [sorted(names) for names in by_position.values() if len(names) > 1]
    return min(repeated)[:2] if repeated else []


def _mm(values) -> str:
    return "x".join(f"{float(value):g}" for value in values) + " mm"


def dicom_files_in(folder: str | Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (not in subfolders)."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise ScanError(f"{folder}: {access_problem(exc)}") from exc
    return [entry for entry in entries if entry.is_file() and not entry.name.startswith(".") and looks_like_dicom(entry)]


def index_dicom_folder(folder: str | Path) -> tuple[list[DicomVolume], list[tuple[Path, str]]]:
    """Volumes of the DICOM files directly inside ``folder``, and the problems found."""
    return index_dicom_files(dicom_files_in(folder))


def read_dicom_volume(volume: DicomVolume, dtype=np.float32) -> Volume:
    """Pixel data of an indexed volume, RescaleSlope/Intercept applied, as (i, j, k) = (cols, rows, slices)."""
    import pydicom

    slices = []
    for path in volume.files:
        dataset = None
        try:
            dataset = pydicom.dcmread(str(path), force=True)
            pixels = _native_pixels(dataset)
            pixels = (_decoded_pixels(dataset) if pixels is None else pixels).astype(np.float32)
        except OSError as exc:
            raise ScanError(f"{path}: {access_problem(exc)}") from exc
        except Exception as exc:
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            what = f" ({syntax.name})" if syntax is not None and syntax.is_compressed else ""
            raise ScanError(
                f"{path}: DICOM pixel data{what} cannot be decoded ({type(exc).__name__}: {exc}); "
                "the file is damaged, re-export it (decoders: pip install -e . installs pylibjpeg and pyjpegls)"
            ) from exc
        slope = _float(dataset.get("RescaleSlope"), default=1.0)
        intercept = _float(dataset.get("RescaleIntercept"), default=0.0)
        if slope != 1.0 or intercept != 0.0:
            pixels = pixels * np.float32(slope) + np.float32(intercept)
        slices.append(pixels.T)  # (rows, cols) -> (i = col, j = row)
    array = np.stack(slices, axis=-1).astype(dtype, copy=False)
    meta = {"series_uid": volume.series_uid, "echo_index": volume.echo_index, "echo_time": volume.echo_time}
    return Volume(array=array, affine=volume.affine.copy(), meta=meta)


def _decoded_pixels(dataset) -> np.ndarray:
    """pydicom's decoded pixels. A decoder written in Rust (pylibjpeg-rle) panics on some damaged
    frames, and its PanicException is a BaseException: it becomes an ordinary error here, so one
    damaged file costs its series, not the whole run. Ctrl-C and exit still pass through."""
    try:
        return dataset.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"the decoder crashed: {type(exc).__name__}: {exc}") from exc


def _native_pixels(dataset) -> np.ndarray | None:
    """The (rows, cols) pixels of an uncompressed single-sample slice, straight from its bytes.

    pydicom's general pixel path costs milliseconds per file whatever the image size; an archive
    of millions of small slices pays that many times. Anything unusual (compressed, several
    samples or frames, BitsStored below BitsAllocated) returns None and takes pydicom's path.
    """
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax.is_compressed or syntax.is_deflated:
        return None
    rows, cols, bits = _uint(dataset, "Rows"), _uint(dataset, "Columns"), _uint(dataset, "BitsAllocated")
    if (_uint(dataset, "SamplesPerPixel") or 1) != 1 or bits not in (8, 16, 32) or _uint(dataset, "BitsStored") != bits:
        return None
    if int(_float(_text(dataset, "NumberOfFrames"), default=1)) > 1 or _tag("PixelData") not in dataset:
        return None
    data = dataset.get_item(_tag("PixelData")).value
    if not isinstance(data, (bytes, bytearray)) or len(data) < rows * cols * bits // 8:
        return None
    kind = "i" if _uint(dataset, "PixelRepresentation") == 1 else "u"
    dtype = np.dtype(f"{kind}{bits // 8}").newbyteorder("<" if syntax.is_little_endian else ">")
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def read_dicom_series(folder: str | Path, series_uid: str | None = None, echo_index: int | None = None) -> Volume:
    """Read one volume from a DICOM folder.

    ``series_uid`` picks a series when the folder holds several; ``echo_index`` (0-based, in
    ascending echo time) picks one echo of a multi-echo series. Either may be omitted when the
    choice is unique. Raises ScanError naming the folder and the choices otherwise.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"{folder}: DICOM folder not found; check the manifest path")
    volumes, problems = index_dicom_folder(folder)
    series_uid = None if _is_blank(series_uid) else str(series_uid)
    echo_index = None if _is_blank(echo_index) or int(echo_index) < 0 else int(echo_index)
    matches = [v for v in volumes if series_uid is None or v.series_uid == series_uid]
    if echo_index is not None:
        matches = [v for v in matches if v.echo_index == echo_index]
    if len(matches) == 1:
        return read_dicom_volume(matches[0])
    if not matches:
        detail = problems[0][1] if problems else "no DICOM image volume matches"
        raise ScanError(f"{folder}: cannot read series {series_uid or ''} echo {echo_index}: {detail}")
    choices = ", ".join(f"{v.series_uid}:{v.echo_index}" for v in matches[:10])
    raise ScanError(f"{folder}: holds {len(matches)} volumes ({choices}); pass series_uid and echo_index to pick one")


def _is_blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""
