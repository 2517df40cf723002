"""What tells one MRI sequence from another: the manifest's sequence columns.

DICOM tags (read by ``orthodiff.io.dicom``) or a dcm2niix BIDS sidecar (``<stem>.json`` beside a
NIfTI/NRRD file) give the raw values; this module turns them into the columns below, a
fat-suppression flag and one ``contrast`` word per series (the rule is in ``contrast_of``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

SEQUENCE_COLUMNS = [
    "series_description", "protocol_name", "manufacturer", "manufacturer_model",
    "repetition_time", "inversion_time", "flip_angle",
    "scanning_sequence", "sequence_variant", "acquisition_type",
    "fat_suppressed", "contrast",
]  # fmt: skip
TEXT_COLUMNS = (
    "series_description", "protocol_name", "manufacturer", "manufacturer_model",
    "scanning_sequence", "sequence_variant", "acquisition_type", "contrast",
)  # fmt: skip
FLOAT_COLUMNS = ("repetition_time", "inversion_time", "flip_angle", "fat_suppressed")
CONTRASTS = ("pd", "t1", "t2", "stir", "gre", "other")

# ScanOptions values that mean fat saturation (GE, Siemens, Philips spellings).
FAT_SAT_OPTIONS = frozenset({"FS", "SFS", "FSA", "FSS", "FSP", "FSI", "FAT", "FATSAT", "SPAIR", "SPIR", "CHESS"})
_FAT_SAT_WORDS = re.compile(r"\b(?:pd|t1|t2|pdw|t1w|t2w|dp)?(?:fs|fsat|fatsat|spair|spir|stir|tirm|sfs)\b|\bfat ?(?:sat|supp)")
_STIR_WORDS = re.compile(r"\b(?:stir|tirm)\b")
_GRE_WORDS = re.compile(
    r"\b(?:dess|gre|gr|flash|fisp|fiesta|trufi|spgr|medic|merge|mede|t2star|vibe|ssfp|swi)\b|\bt2\*|gradient"
)
_WORD_CONTRASTS = (
    ("pd", re.compile(r"\b(?:pd|pdw|pdfs|pd fs|dp|proton|intermediate)")),
    ("t1", re.compile(r"\bt1")),
    ("t2", re.compile(r"\bt2")),
)
STIR_TI_MS = (80.0, 300.0)  # inversion times that null fat at 1.5 T and 3 T
T1_MAX_TR_MS = 1000.0
LONG_TR_MS = 1200.0
PD_MAX_TE_MS = 50.0


def _words(*texts: str) -> str:
    """Lower-case text with separators turned into spaces ('PD_FS-sag' -> 'pd fs sag'); '*' is kept."""
    return re.sub(r"[^a-z0-9*]+", " ", " ".join(t for t in texts if t).lower()).strip()


def fat_suppressed(scan_options, description: str, protocol: str = "") -> float:
    """1.0 fat-suppressed, 0.0 not, NaN unknown.

    ScanOptions FS/SFS/... or the words fs, fat sat, spair, spir, stir, tirm in the description or
    protocol name mean 1.0. A recorded ScanOptions without them means 0.0; no ScanOptions and no
    such word is unknown.
    """
    options = {value.strip().upper() for value in str(scan_options or "").split("\\")}
    if options & FAT_SAT_OPTIONS or _FAT_SAT_WORDS.search(_words(description, protocol)):
        return 1.0
    return 0.0 if scan_options is not None else math.nan


def contrast_of(tr: float, te: float, ti: float, description: str, protocol: str = "", scanning_sequence: str = "") -> str:
    """One of pd, t1, t2, stir, gre, other (times in ms). First rule that applies:

    1. stir: the words STIR / TIRM, or an inversion time of 80-300 ms;
    2. gre: gradient-echo words (DESS, GRE, FLASH, FISP, FIESTA, TrueFISP, SPGR, MEDIC, MERGE,
       T2*, VIBE, SSFP);
    3. pd, t1, t2: the description or protocol name says so (PD / proton / intermediate, T1, T2);
    4. gre: ScanningSequence is GR with no SE or IR;
    5. timing of a spin echo: TR < 1000 and TE < 30 is t1; TR >= 1200 with TE < 50 is pd,
       with TE >= 50 is t2;
    6. other.
    """
    text = _words(description, protocol)
    if _STIR_WORDS.search(text) or (math.isfinite(ti) and STIR_TI_MS[0] <= ti <= STIR_TI_MS[1]):
        return "stir"
    if _GRE_WORDS.search(text):
        return "gre"
    for name, pattern in _WORD_CONTRASTS:
        if pattern.search(text):
            return name
    sequences = {value.strip().upper() for value in str(scanning_sequence or "").split("\\") if value.strip()}
    if "GR" in sequences and not sequences & {"SE", "IR"}:
        return "gre"
    if math.isfinite(tr) and math.isfinite(te):
        if tr < T1_MAX_TR_MS and te < 30.0:
            return "t1"
        if tr >= LONG_TR_MS:
            return "pd" if te < PD_MAX_TE_MS else "t2"
    return "other"


def sequence_fields(tags: dict, echo_time: float) -> dict:
    """The manifest's sequence columns from DICOM-style tags (see ``orthodiff.io.dicom``)."""

    def text(key: str) -> str:
        value = tags.get(key)
        return "" if value is None else str(value).strip()

    def number(key: str) -> float:
        try:
            value = float(tags.get(key))
        except (TypeError, ValueError):
            return math.nan
        return value if math.isfinite(value) else math.nan

    fields = {name: text(name) for name in TEXT_COLUMNS if name != "contrast"}
    for name in ("repetition_time", "inversion_time", "flip_angle"):
        fields[name] = number(name)
    fields["acquisition_type"] = fields["acquisition_type"].upper() if fields["acquisition_type"] in ("2D", "3D", "2d", "3d") else ""
    fields["fat_suppressed"] = fat_suppressed(tags.get("scan_options"), fields["series_description"], fields["protocol_name"])
    fields["contrast"] = contrast_of(
        fields["repetition_time"], float(echo_time), fields["inversion_time"],
        fields["series_description"], fields["protocol_name"], fields["scanning_sequence"],
    )  # fmt: skip
    if fields["contrast"] == "stir":
        fields["fat_suppressed"] = 1.0  # an inversion time of 80-300 ms nulls fat
    return fields


def sidecar_path(image_path: str | Path) -> Path:
    """``knee.nii.gz`` -> ``knee.json`` (dcm2niix writes its BIDS sidecar under the same stem)."""
    from ..io.volume import suffix_of

    path = Path(image_path)
    suffix = suffix_of(path)
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".json")


def read_sidecar(image_path: str | Path) -> tuple[dict, str]:
    """DICOM-style tags from a BIDS sidecar (seconds -> ms) and a problem ("" when none or fine)."""
    import json

    path = sidecar_path(image_path)
    if not path.is_file():
        return {}, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, f"{path.name}: sidecar is not valid JSON ({exc}); fix or remove it, the sequence columns stay empty"
    if not isinstance(data, dict):
        return {}, f"{path.name}: sidecar is not a JSON object; fix or remove it, the sequence columns stay empty"

    def number(key: str) -> float:
        try:
            return float(data[key])
        except (KeyError, TypeError, ValueError):
            return math.nan

    def ms(key: str) -> float:
        return number(key) * 1000.0  # BIDS gives seconds

    def joined(key: str) -> str:
        value = data.get(key, "")
        return "\\".join(str(v) for v in value) if isinstance(value, list) else str(value or "")

    tags = {
        "series_description": str(data.get("SeriesDescription", "") or ""),
        "protocol_name": str(data.get("ProtocolName", "") or ""),
        "manufacturer": str(data.get("Manufacturer", "") or ""),
        "manufacturer_model": str(data.get("ManufacturersModelName", "") or ""),
        "repetition_time": ms("RepetitionTime"),
        "echo_time": ms("EchoTime"),
        "inversion_time": ms("InversionTime"),
        "flip_angle": number("FlipAngle"),
        "scanning_sequence": joined("ScanningSequence"),
        "sequence_variant": joined("SequenceVariant"),
        "acquisition_type": str(data.get("MRAcquisitionType", "") or ""),
        "scan_options": joined("ScanOptions") if "ScanOptions" in data else None,
        "field_strength": number("MagneticFieldStrength"),
        "image_type": tuple(str(v).upper() for v in data.get("ImageType", []) or []),
        "site": str(data.get("InstitutionName", "") or ""),
        "body_part": str(data.get("BodyPartExamined", "") or "").lower(),
    }
    return tags, ""
