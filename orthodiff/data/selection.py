"""Which series a run uses (``data.series``): filters on plane, contrast, fat suppression and
description, then, where a study holds several series of one plane, one winner by the
``prefer`` rules.

Works on any table with manifest columns (the manifest, a cache index, predict's study rows).
Sequence columns that an older manifest lacks count as unknown: an unknown value never passes
a filter that asks for a value, and ranks after known values in ``prefer``. Ties after every
rule go to the lowest series_id, so the choice is the same on every run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import OrthodiffError
from ..planes import PLANES

CONTRASTS = ("pd", "t1", "t2", "stir", "gre", "other")
# prefer rules besides a contrast name (which puts series of that contrast first)
PREFER_RULES = {
    "fat_suppressed": "fat-suppressed series first",
    "not_fat_suppressed": "series without fat suppression first",
    "most_slices": "the series with the most slices",
    "thinnest_slices": "the series with the thinnest slices",
    "3d": "3D acquisitions first",
    "2d": "2D acquisitions first",
}
DESCRIPTION_COLUMNS = ("series_description", "protocol_name")


@dataclass(frozen=True)
class CheckedSelection:
    planes: tuple
    contrasts: tuple
    fat_suppressed: bool | None
    pattern: re.Pattern | None
    prefer: tuple

    @property
    def filters(self) -> bool:
        return bool(self.planes or self.contrasts or self.fat_suppressed is not None or self.pattern is not None)

    def describe(self) -> str:
        parts = []
        if self.planes:
            parts.append(f"planes {', '.join(self.planes)}")
        if self.contrasts:
            parts.append(f"contrasts {', '.join(self.contrasts)}")
        if self.fat_suppressed is not None:
            parts.append("fat-suppressed" if self.fat_suppressed else "not fat-suppressed")
        if self.pattern is not None:
            parts.append(f"description matching {self.pattern.pattern!r}")
        return "; ".join(parts) or "every series"


def check_selection(selection, source: str = "data.series") -> CheckedSelection:
    """Validate a ``SeriesSelection`` (or a mapping with its fields); one line naming the bad field."""
    if selection is None:
        return CheckedSelection((), (), None, None, ())
    if isinstance(selection, CheckedSelection):
        return selection
    get = selection.get if isinstance(selection, dict) else lambda key, default=None: getattr(selection, key, default)
    planes = _names(get("planes", []), f"{source}.planes")
    for plane in planes:
        if plane not in PLANES:
            raise OrthodiffError(f"{source}.planes: unknown plane {plane!r}; use any of {', '.join(PLANES)}")
    contrasts = tuple(name.lower() for name in _names(get("contrasts", []), f"{source}.contrasts"))
    for contrast in contrasts:
        if contrast not in CONTRASTS:
            raise OrthodiffError(f"{source}.contrasts: unknown contrast {contrast!r}; use any of {', '.join(CONTRASTS)}")
    fat = get("fat_suppressed", None)
    if fat is not None and not isinstance(fat, bool):
        raise OrthodiffError(f"{source}.fat_suppressed={fat!r}: use true, false or null (either)")
    regex, pattern = get("description_regex", None), None
    if regex not in (None, ""):
        try:
            pattern = re.compile(str(regex), re.IGNORECASE)
        except re.error as exc:
            raise OrthodiffError(
                f"{source}.description_regex={regex!r} is not a valid regular expression ({exc}); fix or remove it"
            ) from None
    prefer = tuple(str(rule).lower() for rule in _names(get("prefer", []), f"{source}.prefer"))
    for rule in prefer:
        if rule not in PREFER_RULES and rule not in CONTRASTS:
            raise OrthodiffError(
                f"{source}.prefer: unknown rule {rule!r}; use any of {', '.join(PREFER_RULES)} "
                f"or a contrast ({', '.join(CONTRASTS)})"
            )
    return CheckedSelection(planes, contrasts, fat, pattern, prefer)


def selection_spec(selection) -> dict:
    """``{"series": ...}`` for a stage's settings record when the selection differs from the
    default (so records written before selection existed stay valid), else ``{}``."""
    from ..config import SeriesSelection

    checked, default = check_selection(selection), check_selection(SeriesSelection())
    if checked == default:
        return {}
    return {"series": {"filters": checked.describe(), "prefer": list(checked.prefer)}}


def filter_series(frame, selection, source: str = "data.series"):
    """The rows of ``frame`` that pass the selection's filters (every row when it has none)."""
    checked = check_selection(selection, source)
    if not checked.filters or len(frame) == 0:
        return frame
    keep = [True] * len(frame)
    rows = frame.to_dict("records")
    for i, row in enumerate(rows):
        keep[i] = _passes(row, checked)
    return frame[keep]


def order_by_preference(frame, selection, source: str = "data.series"):
    """``frame`` sorted by study, plane, then preference: each (study, plane)'s winner comes first."""
    checked = check_selection(selection, source)
    if len(frame) == 0:
        return frame
    keys = [_preference_key(row, checked.prefer) for row in frame.to_dict("records")]
    order = sorted(range(len(frame)), key=lambda i: (str(frame["study_id"].iloc[i]), _plane_rank(frame["plane"].iloc[i]),
                                                     keys[i], str(frame["series_id"].iloc[i])))
    return frame.iloc[order]


def select_series(frame, selection, one_per_plane: bool = True, source: str = "data.series"):
    """Filter ``frame``; with ``one_per_plane``, keep each study's preferred series of each plane.

    Returns rows in the frame's original order (index kept), so callers may sort as before.
    """
    checked = check_selection(selection, source)
    chosen = filter_series(frame, checked, source)
    if one_per_plane and len(chosen):
        ranked = order_by_preference(chosen, checked, source)
        winners = ranked.drop_duplicates(["study_id", "plane"], keep="first").index
        chosen = chosen.loc[chosen.index.isin(winners)]
    return chosen


def select_cache(cache, selection, one_per_plane: bool = True, source: str = "data.series"):
    """A prepared cache restricted to the selected series (the same object, for chaining);
    one line when nothing is left."""
    chosen = select_series(cache.index, selection, one_per_plane=one_per_plane, source=source)
    if len(chosen) == 0 and len(cache.index):
        raise OrthodiffError(
            f"{source}: no series of the cache {cache.root} passes the selection ({check_selection(selection).describe()}); "
            "widen it, or prepare a cache that holds such series"
        )
    cache.restrict(chosen["series_id"])
    return cache


def require_rows(frame, selected, selection, where: str, source: str = "data.series") -> None:
    """One line when a selection leaves nothing of a non-empty ``frame``, naming the columns it lacked."""
    if len(selected) or not len(frame):
        return
    checked = check_selection(selection, source)
    needed = []
    if checked.contrasts:
        needed.append("contrast")
    if checked.fat_suppressed is not None:
        needed.append("fat_suppressed")
    lacking = [column for column in needed if column not in frame.columns]
    hint = f"; {where} has no {', '.join(lacking)} column (scan the archive again to fill it)" if lacking else ""
    raise OrthodiffError(f"{source}: no series of {where} passes the selection ({checked.describe()}){hint}; widen it")


# ------------------------------------------------------------------------------ internals
def _names(value, field: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        return tuple(str(item).strip() for item in value)
    except TypeError:
        raise OrthodiffError(f"{field}={value!r}: expected a list of names, e.g. [a, b]") from None


def _known(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _fat(row) -> bool | None:
    value = row.get("fat_suppressed")
    if not _known(value):
        return None
    try:
        return bool(float(value))
    except (TypeError, ValueError):
        return None


def _passes(row: dict, checked: CheckedSelection) -> bool:
    if checked.planes and row.get("plane") not in checked.planes:
        return False
    if checked.contrasts:
        contrast = row.get("contrast")
        if not _known(contrast) or str(contrast).lower() not in checked.contrasts:
            return False
    if checked.fat_suppressed is not None and _fat(row) is not checked.fat_suppressed:
        return False
    if checked.pattern is not None:
        texts = [str(row[c]) for c in DESCRIPTION_COLUMNS if _known(row.get(c))]
        if not any(checked.pattern.search(text) for text in texts):
            return False
    return True


def _number(row: dict, column: str) -> float | None:
    value = row.get(column)
    if not _known(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _preference_key(row: dict, prefer: tuple) -> tuple:
    """Smaller is better; every rule gives (unknown?, value) so unknown values rank last."""
    key = []
    for rule in prefer:
        if rule in ("fat_suppressed", "not_fat_suppressed"):
            fat = _fat(row)
            wanted = rule == "fat_suppressed"
            key.append(2 if fat is None else (0 if fat is wanted else 1))
        elif rule == "most_slices":
            slices = _number(row, "n_slices")
            key.append((1, 0.0) if slices is None else (0, -slices))
        elif rule == "thinnest_slices":
            spacing = _number(row, "spacing_slice")
            key.append((1, 0.0) if spacing is None else (0, spacing))
        elif rule in ("2d", "3d"):
            kind = row.get("acquisition_type")
            key.append(2 if not _known(kind) else (0 if str(kind).lower() == rule else 1))
        else:  # a contrast name
            contrast = row.get("contrast")
            key.append(2 if not _known(contrast) else (0 if str(contrast).lower() == rule else 1))
    return tuple(key)


def _plane_rank(plane) -> int:
    return PLANES.index(plane) if plane in PLANES else len(PLANES)
