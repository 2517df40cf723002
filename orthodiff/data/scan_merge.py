"""Joining the manifests of a sharded scan (``orthodiff scan --shard I/N``) into one.

Each shard wrote a manifest, its errors file and a shard record (``<manifest>.shard.json``: shard
I of N, the archive's resolved root and the fingerprint of its top-level folders). The merge
refuses, in one line, shards of different archives, of an archive that changed between shards,
and an incomplete set (naming the missing shards). It concatenates the manifests and:
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
from .shard_record import read_shard_record, shard_record_path

NO_SERIES = "has no series in the archive"


def _check_shard_set(records: list[dict]) -> None:
    """One archive, unchanged between shards, every shard 1..N once; else one line saying what to do."""
    roots = sorted({record["archive"] for record in records})
    if len(roots) > 1:
        first, other = (next(r for r in records if r["archive"] == root) for root in roots[:2])
        raise OrthodiffError(
            f"scan --merge: the shards come from different archives ({first['archive']} in {first['manifest'].name}, "
            f"{other['archive']} in {other['manifest'].name}); merge the shards of one archive only"
        )
    root = roots[0]
    if len({record["archive_units"] for record in records}) > 1:
        raise OrthodiffError(
            f"scan --merge: {root} changed between shards (its top-level folders differ), so shards could overlap "
            "or miss folders; scan every shard again"
        )
    counts = sorted({record["shard"][1] for record in records})
    if len(counts) > 1:
        raise OrthodiffError(
            f"scan --merge: shards of different counts (of {' and of '.join(map(str, counts))}); "
            "merge the N shards of one scan"
        )
    count, seen = counts[0], {}
    for record in records:
        index = record["shard"][0]
        if index in seen:
            raise OrthodiffError(
                f"scan --merge: shard {index}/{count} given twice ({seen[index].name} and {record['manifest'].name}); "
                "pass each shard once"
            )
        seen[index] = record["manifest"]
    missing = [index for index in range(1, count + 1) if index not in seen]
    if missing:
        shards = ", ".join(f"{index}/{count}" for index in missing)
        raise OrthodiffError(
            f"scan --merge: shard(s) {shards} of {root} missing; scan each with `orthodiff scan {root} "
            f"--shard {missing[0]}/{count} --out MANIFEST` (and so on) and merge all {count} manifests"
        )


def merge_scan_shards(manifests, out: str | Path, errors: str | Path | None = None):
    """Merge shard manifests into ``out`` and their errors files into out's errors file."""
    import pandas as pd

    from ..fileio import read_table, write_table
    from .scan import ERROR_COLUMNS, ScanProblem, ScanResult, default_errors_path

    paths = [Path(path).resolve() for path in manifests]
    if not paths:
        raise OrthodiffError("scan --merge: no shard manifests given; pass the files written by scan --shard I/N")
    frames, error_frames, records = [], [], []
    for path in paths:
        if not path.is_file():
            raise OrthodiffError(f"{path}: shard manifest not found; run every shard (scan --shard I/N) first")
        frame = read_table(path)
        if "study_key" not in frame.columns:
            raise OrthodiffError(f"{path}: not a manifest written by this version of `orthodiff scan`; scan the shard again")
        records.append(read_shard_record(path))
        frames.append(frame.assign(_shard=len(frames)))
        errors_path = default_errors_path(path)
        if not errors_path.is_file():
            raise OrthodiffError(f"{errors_path}: errors file of shard {path.name} not found; scan that shard again")
        error_frames.append(pd.read_csv(errors_path, dtype=str, keep_default_na=False))

    _check_shard_set(records)
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
    shard_record_path(out).unlink(missing_ok=True)  # the merged manifest is a whole archive
    write_table(out, frame)
    return ScanResult(manifest=frame, errors=error_list, manifest_path=out, errors_path=errors_path, archive=Path(records[0]["archive"]))


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
