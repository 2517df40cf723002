"""The record a sharded scan leaves beside each shard's manifest (``<manifest>.shard.json``): which
shard of which archive it holds, so that ``scan --merge`` can refuse shards that do not belong
together. Written by ``scan``, read by ``scan_merge``."""

from __future__ import annotations

from pathlib import Path

from ..errors import OrthodiffError

RECORD_FORMAT = "orthodiff-scan-shard"


def shard_record_path(manifest_path: str | Path) -> Path:
    """``runs/m.shard1.parquet`` -> ``runs/m.shard1.shard.json``."""
    return Path(manifest_path).with_suffix(".shard.json")


def write_shard_record(manifest_path: Path, archive: Path, shard: tuple[int, int] | None) -> None:
    """Record which shard of which archive a manifest holds; a manifest of a whole archive has none."""
    from ..fileio import write_json
    from .walk import units_fingerprint

    record = shard_record_path(manifest_path)
    record.unlink(missing_ok=True)  # a record left by an earlier scan to this path must not outlive it
    if shard is None:
        return
    write_json(record, {"format": RECORD_FORMAT, "version": 1, "shard": list(shard), "archive": str(archive),
                        "archive_units": units_fingerprint(archive)})


def read_shard_record(path: Path) -> dict:
    """The shard record of manifest ``path``, with that path under "manifest"; one line when it is missing."""
    from ..fileio import read_format_json

    record = shard_record_path(path)
    if not record.is_file():
        raise OrthodiffError(
            f"{record}: shard record not found, so {path.name} is not known as one shard of an archive; "
            "scan it again with --shard I/N"
        )
    data = read_format_json(record, RECORD_FORMAT, "scan shard record", "scan that shard again")
    return {**data, "manifest": path}
