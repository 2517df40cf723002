"""The manifest: one row per series, written by ``orthodiff scan`` and read by every later stage."""

from __future__ import annotations

from pathlib import Path

from ..errors import OrthodiffError

LABEL_PREFIX = "label_"
REQUIRED_COLUMNS = ("patient_id", "study_id", "series_id", "plane", "path", "format")
FORMATS = ("nifti", "itk", "dicom", "mrnet")


def label_columns(frame) -> list[str]:
    """The manifest's label columns, in order (``label_acl_tear`` ...)."""
    return [column for column in frame.columns if column.startswith(LABEL_PREFIX)]


def label_names(frame) -> list[str]:
    return [column[len(LABEL_PREFIX):] for column in label_columns(frame)]


def read_manifest(path: str | Path):
    """Read a manifest and check that it has the columns every stage relies on."""
    from ..fileio import read_table

    try:
        frame = read_table(path)
    except ValueError:  # undecodable bytes, a CSV parser's or pyarrow's complaint: not a table at all
        raise OrthodiffError(
            f"{path}: not a manifest (a .parquet or .csv table written by `orthodiff scan`); for images, "
            "scan their folder first: `orthodiff scan ARCHIVE --out manifest.parquet`"
        ) from None
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise OrthodiffError(f"{path}: manifest lacks columns {missing}; write it with `orthodiff scan`")
    for column in ("patient_id", "study_id", "series_id", "series_uid"):
        if column in frame.columns:  # CSV round trips can turn ids into numbers
            frame[column] = frame[column].fillna("").astype(str)
    if frame["series_id"].duplicated().any():
        duplicate = frame.loc[frame["series_id"].duplicated(), "series_id"].iloc[0]
        raise OrthodiffError(f"{path}: series_id {duplicate!r} appears twice; series ids must be unique")
    return frame


def check_labels(frame, wanted: list[str] | None, source: str) -> list[str]:
    """The label names to use: ``wanted`` if given (each must exist), else all of the manifest's."""
    available = label_names(frame)
    if not wanted:
        return available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise OrthodiffError(
            f"{source}: labels {unknown} are not in the manifest; available: {', '.join(available) or 'none'}"
        )
    return list(wanted)


def load_series(row):
    """Read the volume of one manifest row, with its geometry, whatever its format."""
    fmt = row["format"]
    if fmt in ("nifti", "itk"):
        from ..io.volume import read_volume

        return read_volume(row["path"])
    if fmt == "dicom":
        from ..io.dicom import read_dicom_series

        return read_dicom_series(row["path"], series_uid=row.get("series_uid"), echo_index=row.get("echo_index"))
    if fmt == "mrnet":
        from ..io.mrnet import read_mrnet

        return read_mrnet(row["path"], plane=row["plane"])
    raise OrthodiffError(f"manifest row {row['series_id']}: unknown format {fmt!r}; expected one of {FORMATS}")
