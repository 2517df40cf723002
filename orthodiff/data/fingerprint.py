"""Which data a manifest, cache or splits file describes: one short fingerprint for all three.

The fingerprint is a sha256 over the sorted (patient, study, series, plane) rows of the
manifest, so a splits file and a cache agree exactly when they were made from the same
series. It ignores paths and labels: moving an archive or relabelling it keeps the data.
Stages that read a cache together with a splits file compare the two, so a splits file from
another manifest is refused instead of silently training on the few patients they share.
"""

from __future__ import annotations

import hashlib

from ..errors import OrthodiffError

FINGERPRINT_COLUMNS = ("patient_id", "study_id", "series_id", "plane")


def data_fingerprint(frame) -> str:
    """sha256 hex digest of the manifest rows' (patient, study, series, plane), order-free."""
    missing = [c for c in FINGERPRINT_COLUMNS if c not in frame.columns]
    if missing:
        raise OrthodiffError(f"manifest lacks columns {missing}; write it with `orthodiff scan`")
    rows = sorted("\t".join(str(row[c]) for c in FINGERPRINT_COLUMNS) for row in frame.to_dict("records"))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def check_same_data(cache_fingerprint, cache_where: str, splits_fingerprint, splits_where: str) -> None:
    """One line naming both files when they were made from different manifests.

    Files written before fingerprints existed carry none and are not compared.
    """
    if not cache_fingerprint or not splits_fingerprint or cache_fingerprint == splits_fingerprint:
        return
    raise OrthodiffError(
        f"{splits_where} and {cache_where} come from different manifests (data fingerprint "
        f"{splits_fingerprint[:12]} vs {cache_fingerprint[:12]}); split the cache's manifest into a new file "
        "(`orthodiff split MANIFEST --out NEW`) or prepare the cache from the splits' manifest"
    )
