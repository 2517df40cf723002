"""Preparing a cache in shards (``--shard I/N``, e.g. one SLURM array task each) and merging them.

Shard I of N takes the series whose id hashes to I (a deterministic, manifest-order-free 1/N)
and writes a complete cache of its own into ``CACHE/shards/I-of-N``, so concurrent shards never
touch one file. The merge checks that every shard was prepared with the same settings from the
same manifest and that together they cover it, then writes the top cache's records, index and
errors; the plane tensors stay where the shards wrote them (the index points there).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import OrthodiffError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
SHARDS_DIR = "shards"


def parse_shard(text) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) -> (I, N); a tuple passes through the same check."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        index, count = (int(v) for v in text)
    else:
        match = _SHARD.match(str(text))
        if not match:
            raise OrthodiffError(f"--shard {text!r}: expected I/N, e.g. 2/8 for the second of eight shards")
        index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise OrthodiffError(f"--shard {index}/{count}: I must be between 1 and N")
    return index, count


def shard_of(series_id: str, count: int) -> int:
    """The shard (1..count) that a series belongs to."""
    return int(hashlib.sha256(str(series_id).encode()).hexdigest()[:15], 16) % count + 1


def shard_folder(out, index: int, count: int) -> Path:
    return Path(out) / SHARDS_DIR / f"{index}-of-{count}"


def shard_rows(frame, index: int, count: int):
    """The manifest rows of shard ``index`` of ``count``."""
    mask = [shard_of(sid, count) == index for sid in frame["series_id"]]
    return frame[mask]


def merge_shards(manifest, out, selection=None) -> dict:
    """Join ``out/shards/*-of-N`` into the cache ``out``; a summary dict. One line when a shard is
    missing, unfinished, or was prepared with other settings or from another manifest.
    ``selection``: the ``data.series`` the shards were prepared with (they hold only its series).
    It holds the cache's lock, as ``prepare`` does, so a merge and a run into ``out`` never interleave."""
    from ..locks import exclusive

    with exclusive(out, "prepare", "prepare"):
        return _merge_into(manifest, Path(out), selection)


def _merge_into(manifest, out: Path, selection) -> dict:
    import pandas as pd

    from ..fileio import read_json, write_json, write_table
    from .fingerprint import data_fingerprint
    from .manifest import read_manifest

    out = Path(out)
    frame = manifest.copy() if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    source = "the manifest" if isinstance(manifest, pd.DataFrame) else str(manifest)
    fingerprint = data_fingerprint(frame)
    if selection is not None:
        from .selection import filter_series

        frame = filter_series(frame, selection)
    found = sorted((out / SHARDS_DIR).glob("*-of-*")) if (out / SHARDS_DIR).is_dir() else []
    counts = {int(p.name.split("-of-")[1]) for p in found if re.match(r"^\d+-of-\d+$", p.name)}
    if len(counts) != 1:
        raise OrthodiffError(
            f"{out / SHARDS_DIR}: expected shard folders of one count (I-of-N), found "
            f"{sorted(p.name for p in found) or 'none'}; run `orthodiff prepare MANIFEST --out {out} --shard I/N` for each I"
        )
    count = counts.pop()
    metas, indexes, errors = [], [], []
    for index in range(1, count + 1):
        folder = shard_folder(out, index, count)
        if not (folder / "cache.json").exists() or not (folder / "index.parquet").exists():
            raise OrthodiffError(f"{folder}: shard {index}/{count} is missing or unfinished; run it (again) with --shard {index}/{count}")
        meta = read_json(folder / "cache.json")
        if meta.get("manifest_fingerprint") != fingerprint:
            raise OrthodiffError(
                f"{folder}: shard {index}/{count} was prepared from another manifest than {source}; prepare it again"
            )
        metas.append(meta)
        shard_index = pd.read_parquet(folder / "index.parquet")
        prefix = f"{SHARDS_DIR}/{folder.name}/"
        for column in ("image", "seg"):
            shard_index[column] = [prefix + v if isinstance(v, str) and v else "" for v in shard_index[column]]
        indexes.append(shard_index)
        failed = pd.read_csv(folder / "errors.csv", dtype={"series_id": str}) if (folder / "errors.csv").exists() else None
        if failed is not None:
            errors.append(failed)
        expected = set(shard_rows(frame, index, count)["series_id"])
        accounted = set(shard_index["series_id"]) | (set(failed["series_id"]) if failed is not None else set())
        if not expected <= accounted:
            raise OrthodiffError(
                f"{folder}: shard {index}/{count} has not finished ({len(expected - accounted)} series left); "
                f"run it again with --shard {index}/{count}"
            )
    settings = ("plane_size", "slice_spacing", "slab", "field_of_view_mm")
    for meta in metas[1:]:
        for key in settings:
            if meta.get(key) != metas[0].get(key):
                raise OrthodiffError(
                    f"{out / SHARDS_DIR}: shards were prepared with different {key} ({metas[0].get(key)} vs "
                    f"{meta.get(key)}); prepare them again with one config"
                )
    top = {key: value for key, value in metas[0].items() if key != "shard"}
    if (out / "cache.json").exists():
        existing = read_json(out / "cache.json")
        for key in settings:
            if existing.get(key, "crop" if key == "slab" else None) != top.get(key):
                raise OrthodiffError(
                    f"{out}: this cache was prepared with {key}={existing.get(key)}, the shards with {top.get(key)}; "
                    "merge into a new folder"
                )
    index = pd.concat(indexes, ignore_index=True).sort_values("series_id").reset_index(drop=True)
    records, indexed = out / "records", set(index["series_id"])
    for index_number in range(1, count + 1):
        folder = shard_folder(out, index_number, count)
        prefix = f"{SHARDS_DIR}/{folder.name}/"
        for record_path in sorted((folder / "records").glob("*.json")):
            record = read_json(record_path)
            if record.get("series_id") not in indexed:
                continue
            record["image"] = prefix + record["image"]
            record["seg"] = prefix + record["seg"] if record.get("seg") else ""
            write_json(records / record_path.name, record)
    write_json(out / "cache.json", top)
    error_frame = pd.concat(errors, ignore_index=True) if errors else pd.DataFrame(columns=["series_id", "path", "reason"])
    write_table(out / "errors.csv", error_frame.sort_values("series_id"))
    write_table(out / "index.parquet", index)
    return {"out": out, "shards": count, "series": len(index), "errors": len(error_frame)}
