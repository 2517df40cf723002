"""Per-study tables the scan attaches to series: labels.csv, metadata.csv and MRNet's label CSVs.

Each reader returns its table plus a list of (path, reason) problems; a bad row or column is
reported and left out, never fatal, so one typo does not stop a scan of thousands of studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.mrnet import LABELS as MRNET_LABELS
from ..io.mrnet import SPLITS as MRNET_SPLITS

METADATA_FIELDS = ("joint", "site", "field_strength", "age", "sex", "height", "weight")
NUMERIC_FIELDS = ("field_strength", "age", "height", "weight")
TEXT_FIELDS = ("joint", "site", "sex")
# Order in which MRNet's labels appear as columns.
MRNET_LABEL_ORDER = ("acl", "meniscus", "abnormal")
assert set(MRNET_LABEL_ORDER) == set(MRNET_LABELS)

Problem = tuple  # (path, reason)


@dataclass
class LabelTable:
    names: list = field(default_factory=list)  # label names in column order
    values: dict = field(default_factory=dict)  # study_id -> {name: 0.0 / 1.0 / nan}
    sources: dict = field(default_factory=dict)  # study_id -> (file, "file row N") for messages


@dataclass
class MetadataTable:
    rows: dict = field(default_factory=dict)  # study_id -> {"patient_id", fields..., extras...}
    extra_columns: list = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # study_id -> (file, "file row N")


def _read_text_csv(path: Path, header="infer"):
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False, header=header, skipinitialspace=True)


def read_labels_csv(path: Path, known_labels: list | None) -> tuple[LabelTable, list[Problem]]:
    """labels.csv: a study_id column and one 0/1 column per label (blank = unknown).

    ``known_labels`` (archive.json "labels") rejects columns it does not list.
    """
    import pandas as pd

    table, problems = LabelTable(), []
    try:
        frame = _read_text_csv(path)
    except Exception as exc:
        return table, [(path, f"{path.name}: cannot be read as CSV ({type(exc).__name__}: {exc}); fix the file, labels were not attached")]
    if "study_id" not in frame.columns:
        return table, [(path, f"{path.name}: has no study_id column (columns: {', '.join(frame.columns)}); add it, labels were not attached")]
    names = []
    for column in frame.columns:
        if column in ("study_id", "patient_id"):
            continue
        if known_labels is not None and column not in known_labels:
            problems.append(
                (path, f"{path.name}: unknown label {column!r} (archive.json lists {', '.join(known_labels)}); rename or remove the column, it was skipped")
            )
            continue
        names.append(column)
    table.names = names
    numeric = {}
    for name in names:
        raw = frame[name].str.strip()
        blank = raw.str.lower().isin(["", "nan", "na"])
        values = pd.to_numeric(raw.where(~blank), errors="coerce")
        bad = ~blank & ~values.isin([0, 1])
        if bad.any():
            problems.append(
                (path, f"{path.name}: label {name!r} has values other than 0/1 ({', '.join(sorted(set(raw[bad]))[:3])}); they were read as unknown, fix them")
            )
        numeric[name] = values.where(values.isin([0, 1]))
    for position, study in enumerate(frame["study_id"].str.strip()):
        where = f"{path.name} row {position + 2}"
        if not study:
            problems.append((path, f"{where}: empty study_id; fill it in or delete the row"))
            continue
        if study in table.values:
            problems.append((path, f"{where}: study {study!r} appears again (first in {table.sources[study][1]}); the first row was kept"))
            continue
        table.values[study] = {name: float(numeric[name].iloc[position]) for name in names}
        table.sources[study] = (path, where)
    return table, problems


def read_mrnet_labels(root: Path, exams: dict) -> tuple[LabelTable, list[Problem]]:
    """MRNet's ``{train,valid}-{acl,meniscus,abnormal}.csv`` (rows "0000,1", no header) under ``root``.

    ``exams`` maps (split, exam number as int) -> study_id of the exams found on disk.
    """
    table, problems = LabelTable(), []
    for split in MRNET_SPLITS:
        for name in MRNET_LABEL_ORDER:
            path = root / f"{split}-{name}.csv"
            if not path.exists():
                continue
            if name not in table.names:
                table.names.append(name)
            try:
                frame = _read_text_csv(path, header=None)
            except Exception as exc:
                problems.append((path, f"{path.name}: cannot be read as CSV ({type(exc).__name__}); fix the file, its labels were not attached"))
                continue
            for position, (exam, value) in enumerate(zip(frame[0], frame[1] if 1 in frame else [])):
                where = f"{path.name} row {position + 1}"
                try:
                    number, label = int(exam), float(value)
                except ValueError:
                    if position == 0:
                        continue  # a header line
                    problems.append((path, f"{where}: expected 'exam,0|1', got {exam!r},{value!r}; fix the row"))
                    continue
                study = exams.get((split, number))
                if study is None:
                    problems.append((path, f"{where}: exam {exam} has no {split}/<plane>/{exam}.npy in the archive; add the exam or delete the row"))
                    continue
                if label not in (0.0, 1.0):
                    problems.append((path, f"{where}: label {value!r} is not 0 or 1; it was read as unknown"))
                    label = math.nan
                table.values.setdefault(study, {})[name] = label
                table.sources.setdefault(study, (path, where))
    return table, problems


def merge_labels(tables: list[LabelTable]) -> LabelTable:
    merged = LabelTable()
    for table in tables:
        merged.names.extend(name for name in table.names if name not in merged.names)
        for study, values in table.values.items():
            merged.values.setdefault(study, {}).update(values)
            if study in table.sources:
                merged.sources.setdefault(study, table.sources[study])
    return merged


def read_metadata_csv(path: Path) -> tuple[MetadataTable, list[Problem]]:
    """metadata.csv: study_id, optional patient_id, the metadata fields, any extra columns.

    One patient id whose rows disagree on sex is reported; that patient's sex becomes unknown.
    """
    import pandas as pd

    table, problems = MetadataTable(), []
    try:
        frame = _read_text_csv(path)
    except Exception as exc:
        return table, [(path, f"{path.name}: cannot be read as CSV ({type(exc).__name__}: {exc}); fix the file, metadata was not attached")]
    if "study_id" not in frame.columns:
        return table, [(path, f"{path.name}: has no study_id column (columns: {', '.join(frame.columns)}); add it, metadata was not attached")]
    frame = frame.apply(lambda column: column.str.strip())
    table.extra_columns = [c for c in frame.columns if c not in ("study_id", "patient_id") + METADATA_FIELDS]
    numeric = {name: pd.to_numeric(frame[name].replace("", "nan"), errors="coerce") for name in NUMERIC_FIELDS if name in frame}
    sex_rows: dict[str, dict[str, list[int]]] = {}
    for position, study in enumerate(frame["study_id"]):
        where = f"{path.name} row {position + 2}"
        if not study:
            problems.append((path, f"{where}: empty study_id; fill it in or delete the row"))
            continue
        if study in table.rows:
            problems.append((path, f"{where}: study {study!r} appears again (first in {table.sources[study][1]}); the first row was kept"))
            continue
        row = {"patient_id": frame["patient_id"].iloc[position] if "patient_id" in frame else ""}
        for name in TEXT_FIELDS:
            row[name] = frame[name].iloc[position] if name in frame else ""
        row["sex"] = normalise_sex(row["sex"])
        for name in NUMERIC_FIELDS:
            row[name] = float(numeric[name].iloc[position]) if name in numeric else math.nan
        for name in table.extra_columns:
            row[name] = frame[name].iloc[position]
        table.rows[study] = row
        table.sources[study] = (path, where)
        if row["patient_id"] and row["sex"]:
            sex_rows.setdefault(row["patient_id"], {}).setdefault(row["sex"], []).append(position + 2)
    for patient, by_sex in sorted(sex_rows.items()):
        if len(by_sex) > 1:
            detail = "; ".join(f"{sex} in rows {', '.join(map(str, rows))}" for sex, rows in sorted(by_sex.items()))
            problems.append((path, f"{path.name}: patient {patient!r} has conflicting sex ({detail}); fix the rows, sex was set to unknown"))
            for row in table.rows.values():
                if row["patient_id"] == patient:
                    row["sex"] = ""
                    row["sex_conflict"] = True
    return table, problems


def normalise_sex(value) -> str:
    """'F' or 'M' from the usual spellings; '' when unknown."""
    text = str(value or "").strip().upper()
    if text in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    if text in ("M", "MALE", "MAN"):
        return "M"
    return ""


def dicom_age_years(text: str) -> float:
    """DICOM PatientAge ('045Y', '006M', '010W', '003D') in years; NaN when absent or malformed."""
    text = (text or "").strip().upper()
    units = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
    if len(text) >= 2 and text[-1] in units and text[:-1].isdigit():
        return float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        return math.nan


def field_strength_tesla(value: float) -> float:
    """MagneticFieldStrength in tesla; some scanners write gauss (15000 for 1.5 T)."""
    if value is None or not np.isfinite(value):
        return math.nan
    return value / 10000.0 if value > 100 else float(value)
