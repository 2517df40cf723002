"""Every metric overall and again within each site and each field strength."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

STRATA = ("site", "field_strength")


def stratified(frame: pd.DataFrame, compute: Callable[[pd.DataFrame], dict]) -> dict:
    """{"overall": compute(frame), "by_site": {site: ...}, "by_field_strength": {"1.5T": ...}}.

    ``frame`` carries the normalised ``site`` and ``field_strength`` columns (unknown values are
    their own group, named "unknown"), so no row is silently dropped from a stratified table.
    """
    result = {"overall": compute(frame)}
    for column in STRATA:
        result[f"by_{column}"] = {
            str(name): compute(group) for name, group in frame.groupby(column, sort=True)
        }
    return result
