"""A held-out domain of a manifest: the patients with any series whose ``column`` has ``value``
(a site, a manufacturer, a field strength, a contrast ...), as ``--held-out COLUMN=VALUE`` names it.

A patient is held out whole when any of its series is of the domain (patients never straddle
splits), so a per-series column such as contrast holds out every patient scanned with that contrast.
Numbers match numerically (``field_strength=3`` is 3.0 T), text without regard to case or
surrounding spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import OrthodiffError

# manifest columns that identify or locate a series, or describe its grid: nothing to hold out
_NOT_DOMAINS = {"patient_id", "study_id", "series_id", "path", "format", "series_uid", "study_key", "seg_path",
                "echo_index", "n_slices", "rows", "cols", "spacing_slice", "spacing_row", "spacing_col",
                "normal_x", "normal_y", "normal_z", "plane"}
_SHOWN_VALUES = 12  # values listed in a refusal


@dataclass(frozen=True)
class HeldOut:
    column: str
    value: str

    @classmethod
    def parse(cls, text: str) -> HeldOut:
        column, _, value = str(text).partition("=")
        if not column.strip() or not value.strip():
            raise OrthodiffError(f"--held-out {text!r}: expected COLUMN=VALUE, e.g. site=Lakeside or "
                                 "field_strength=1.5 (a column of the labeled archive's manifest)")
        return cls(column.strip(), value.strip())

    @property
    def name(self) -> str:
        """The robustness scenario's name: ``unseen-<column>-<value>``, safe as a file name."""
        safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.value.lower()).strip("-")
        return f"unseen-{self.column}-{safe or 'blank'}"

    def __str__(self) -> str:
        return f"{self.column}={self.value}"

    def in_domain(self, frame):
        """Per row of ``frame``: is this series of the held-out domain?"""
        import pandas as pd

        values = frame[self.column]
        if pd.api.types.is_numeric_dtype(values):
            wanted = pd.to_numeric(pd.Series([self.value]), errors="coerce").iloc[0]
            return values.sub(wanted).abs().lt(1e-6) if pd.notna(wanted) else pd.Series(False, index=frame.index)
        return values.astype("string").str.strip().str.lower().eq(self.value.lower()).fillna(False).astype(bool)

    def patients(self, frame) -> set[str]:
        """The patients of ``frame`` (a manifest) with any series of the held-out domain."""
        if self.column not in frame.columns:
            return set()
        return set(frame.loc[self.in_domain(frame), "patient_id"].astype(str))

    def check(self, frame, source) -> set[str]:
        """The held-out patients of the labeled manifest ``frame``; one line naming the column and
        the values present when the column is missing or no series has the value."""
        if self.column not in frame.columns:
            columns = ", ".join(domain_columns(frame)) or "none"
            raise OrthodiffError(f"--held-out {self}: {source} has no column {self.column!r}; columns to hold out "
                                 f"(two or more values): {columns}")
        held = self.patients(frame)
        if not held:
            raise OrthodiffError(f"--held-out {self}: no series of {source} has {self.column} {self.value!r}; "
                                 f"values present: {values_present(frame, self.column)}")
        return held


    def as_spelled_in(self, frame, source) -> HeldOut:
        """This domain checked against the labeled manifest ``frame`` (see ``check``), its text value
        spelled as the archive spells it."""
        self.check(frame, source)
        values = frame.loc[self.in_domain(frame), self.column]
        if isinstance(values.iloc[0], str):
            return HeldOut(self.column, values.iloc[0].strip())
        return self


def domain_columns(frame) -> list[str]:
    """The manifest's metadata columns with at least two values: what a robustness bench can hold out."""
    return [c for c in frame.columns
            if c not in _NOT_DOMAINS and not c.startswith("label_") and frame[c].dropna().nunique() > 1]


def values_present(frame, column: str) -> str:
    """``column``'s values with their patient counts, most patients first (a dozen at most)."""
    import pandas as pd

    values = frame[column]
    if pd.api.types.is_numeric_dtype(values):
        values = values.map(lambda v: f"{v:g}" if pd.notna(v) else None)
    known = frame.assign(_value=values.astype("string").str.strip()).dropna(subset=["_value"])
    known = known[known["_value"] != ""]
    if known.empty:
        return "none (the column is empty)"
    counts = known.groupby("_value")["patient_id"].nunique().sort_values(ascending=False, kind="stable")
    shown = [f"{value!r} ({count} patients)" for value, count in counts.head(_SHOWN_VALUES).items()]
    more = f" and {len(counts) - _SHOWN_VALUES} more" if len(counts) > _SHOWN_VALUES else ""
    return ", ".join(shown) + more


__all__ = ["HeldOut", "domain_columns", "values_present"]
