"""Joining the manifests of a sharded scan (``orthodiff scan --shard I/N``) into one.

Each shard wrote a manifest and its errors file. The merge concatenates the manifests and:
- gives a short study id used by different studies in different shards (a StudyID counter such
  as "1", or two patients' "visit1") its long form (``study_key``), as one whole-archive scan
  would, drops the labels matched by the short id and reports it;
- keeps an archive-wide problem (a broken archive.json, an unknown label column) once;
- keeps "a labels/metadata row has no series" only when no shard found that study.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OrthodiffError
from ..planes import PLANES
from .manifest import LABEL_PREFIX

NO_SERIES = "has no series in the archive"


def merge_scan_shards(manifests, out: str | Path, errors: str | Path | None = None):
    """Merge shard manifests into ``out`` and their errors files into out's errors file."""
    import pandas as pd

    from ..fileio import read_table, write_table
    from .scan import ERROR_COLUMNS, ScanProblem, ScanResult, default_errors_path

    paths = [Path(path).resolve() for path in manifests]
    if not paths:
        raise OrthodiffError("scan --merge: no shard manifests given; pass the files written by scan --shard I/N")
    frames, error_frames = [], []
    for path in paths:
        if not path.is_file():
            raise OrthodiffError(f"{path}: shard manifest not found; run every shard (scan --shard I/N) first")
        frame = read_table(path)
        if "study_key" not in frame.columns:
            raise OrthodiffError(f"{path}: not a manifest written by this version of `orthodiff scan`; scan the shard again")
        frames.append(frame.assign(_shard=len(frames)))
        errors_path = default_errors_path(path)
        if not errors_path.is_file():
            raise OrthodiffError(f"{errors_path}: errors file of shard {path.name} not found; scan that shard again")
        error_frames.append(pd.read_csv(errors_path, dtype=str, keep_default_na=False))

    out = Path(out).resolve()
    problems = _merged_problems(error_frames)
    frame = pd.concat(frames, ignore_index=True, sort=False)
    frame = _resolve_study_clashes(frame, problems, out)
    label_columns = [c for c in frame.columns if c.startswith(LABEL_PREFIX)]
    others = [c for c in frame.columns if c not in label_columns and c != "_shard"]
    frame = frame[others + label_columns]
    if frame["series_id"].duplicated().any():
        duplicate = frame.loc[frame["series_id"].duplicated(), "series_id"].iloc[0]
        raise OrthodiffError(f"series {duplicate!r} is in two shard manifests; merge the manifests of one scan only, each shard once")
    plane_rank = frame["plane"].map({plane: rank for rank, plane in enumerate(PLANES)})
    order = frame.assign(_plane=plane_rank).sort_values(["patient_id", "study_id", "_plane", "series_id"], kind="stable").index
    frame = frame.loc[order].reset_index(drop=True)  # the order of one whole-archive scan

    errors_path = Path(errors).resolve() if errors else default_errors_path(out)
    error_list = [ScanProblem(path, reason) for path, reason in problems]
    write_table(errors_path, pd.DataFrame([[p.path, p.reason] for p in error_list], columns=ERROR_COLUMNS))
    write_table(out, frame)
    return ScanResult(manifest=frame, errors=error_list, manifest_path=out, errors_path=errors_path, archive=Path(f"{len(paths)} shards"))


def _merged_problems(error_frames) -> list[tuple[str, str]]:
    """Every shard's problems once each; a 'no series' row only if every shard reported it."""
    seen: dict[tuple[str, str], int] = {}
    for errors in error_frames:
        for row in dict.fromkeys(zip(errors["path"], errors["reason"])):
            seen[row] = seen.get(row, 0) + 1
    return [row for row, count in seen.items() if NO_SERIES not in row[1] or count == len(error_frames)]


def _resolve_study_clashes(frame, problems: list, out: Path):
    """A study id naming different studies (``study_key``) in different shards takes its long form."""
    owners = frame.groupby("study_id")["study_key"].nunique()
    clashing = set(owners[owners > 1].index)
    if not clashing:
        return frame
    frame = frame.copy()
    labels = [c for c in frame.columns if c.startswith(LABEL_PREFIX)]
    for study in sorted(clashing):
        rows = frame["study_id"] == study
        for key in sorted(set(frame.loc[rows, "study_key"])):
            mine = rows & (frame["study_key"] == key)
            long_id = key.split(":", 1)[1]
            frame.loc[mine, "series_id"] = long_id + frame.loc[mine, "series_id"].str.slice(len(study))
            frame.loc[mine & (frame["patient_id"] == study), "patient_id"] = long_id
            frame.loc[mine, "study_id"] = long_id
            frame.loc[mine, labels] = float("nan")
        problems.append(
            (str(out), f"study id {study!r} names different studies in different shards; they were renamed to their long ids "
             "(StudyInstanceUID or folder path) and their labels dropped, give labels by the long id and merge again")
        )
    return frame
