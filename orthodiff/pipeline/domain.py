"""What a pipeline was trained on, and how a new series differs from it.

At export, :func:`run_training_domain` summarises per plane the series the classify run trained
on (its cache, restricted to its ``data.series`` selection and to the training patients of its
splits): contrasts, fat suppression, field strengths, sites, manufacturers, the ranges of in-plane
pixel spacing and slice thickness, and the distribution of the plane tensors' intensities. The
record goes into ``pipeline.json`` as ``training_domain``.

At prediction, :func:`compare_series` says in plain words how one input series differs:

- contrast: one the plane's training series never had. ``other`` (what ``orthodiff scan`` says
  when no rule of ``data.sequence.contrast_of`` applies, also when the tags are missing) is not
  compared on either side.
- fat suppression: with, where every training series was without (or the reverse).
- field strength (to 0.1 T), manufacturer and site (ignoring case): a value never seen in training.
- pixel spacing and slice thickness: more than ``SPACING_FACTOR`` times beyond the training range
  (above its largest value times the factor, or below its smallest divided by it).
- intensities: quantiles (``INTENSITY_QUANTILES``) of the plane tensor's voxels, which is what the
  model reads. A quantile is far when it lies outside the training series' range of it AND more
  than ``INTENSITY_Z`` robust standard deviations (1.4826 x the median absolute deviation, at
  least ``MIN_INTENSITY_SCALE``) from their median. "Outside the range" means by more than
  ``INTENSITY_MARGIN``: the cache holds float16 tensors, and a training series itself must pass. The tensor is the series scaled from its own
  0.5th-99.5th percentiles, so a series multiplied by a constant or offset by one gives the same
  tensor (and the same probabilities) and is not flagged; a changed contrast, a strong bias
  field or an unusual histogram is.

A value the input does not record (a NIfTI file without its sidecar has no sequence tags) is not
compared. The notes describe the input; they never change a probability.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

from ..errors import OrthodiffError
from ..planes import PLANES

DOMAIN_VERSION = 1
SPACING_FACTOR = 1.5
INTENSITY_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
INTENSITY_Z = 5.0
MIN_INTENSITY_SCALE = 0.05  # plane tensors span [-1, 1]; a near-constant training set still leaves room
INTENSITY_MARGIN = 0.02
MAX_INTENSITY_SERIES = 500  # per plane: enough for the quantiles' spread, bounded export time
MAX_INTENSITY_VOXELS = 65536  # voxels a tensor's quantiles are read from, evenly strided (16 x 256 x 256: every 16th)
UNKNOWN_CONTRASTS = ("", "other")
LISTED_VALUES = 6  # values named in a note before "and N more"


# ------------------------------------------------------------------------- one series
def header_facts(row: Mapping) -> dict:
    """Contrast, fat suppression, field strength, site and manufacturer of a manifest-like row;
    None where the row does not record it."""
    contrast = _text(row.get("contrast")).lower()
    fat = _number(row.get("fat_suppressed"))
    field = _number(row.get("field_strength"))
    return {
        "contrast": None if contrast in UNKNOWN_CONTRASTS else contrast,
        "fat_suppressed": None if fat is None else bool(fat >= 0.5),
        "field_strength": None if field is None or field <= 0 else _tesla(field),
        "site": _text(row.get("site")) or None,
        "manufacturer": _text(row.get("manufacturer")) or None,
    }


def intensity_quantiles(image: np.ndarray) -> list[float]:
    """The ``INTENSITY_QUANTILES`` of a plane tensor's voxels (of at most ``MAX_INTENSITY_VOXELS``
    of them, evenly strided: the quantiles barely move, and export reads hundreds of tensors)."""
    values = np.asarray(image).ravel()
    stride = -(-values.size // MAX_INTENSITY_VOXELS)
    return [float(v) for v in np.quantile(values[::stride].astype(np.float32), INTENSITY_QUANTILES)]


def voxel_spacing(affine) -> tuple[list[float], float]:
    """(in-plane pixel spacing [row, col], slice thickness) in mm of a voxel -> RAS affine whose
    third voxel axis runs across slices (the convention of ``io.volume.Volume`` and the manifest)."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return [float(spacing[1]), float(spacing[0])], float(spacing[2])


# ------------------------------------------------------------------------- the record
def run_training_domain(info: Mapping, cfg) -> dict:
    """The training domain of a classify run (its run.json ``info`` and resolved config)."""
    from ..data.cache import PlaneCache
    from ..data.selection import select_cache
    from ..data.splits import load_splits
    from ..finetune.studies import run_patients

    try:
        cache = select_cache(PlaneCache(info["cache"]), cfg.data.series)
        patients = run_patients(load_splits(info["splits"]), info.get("labels_fraction", 1.0))["train"]
    except (KeyError, OrthodiffError) as exc:
        raise OrthodiffError(
            f"the pipeline records what its classify run trained on, read from the run's cache and splits, which cannot "
            f"be read ({' '.join(str(exc).split())}); keep them in place while assembling the pipeline"
        ) from None
    return training_domain(cache, patients)


def training_domain(cache, patient_ids) -> dict:
    """Per plane: what the training series of ``patient_ids`` in a prepared cache were."""
    planes = {}
    for plane in PLANES:
        rows = cache.series(plane, patient_ids=patient_ids)
        if len(rows):
            planes[plane] = _plane_record(rows, cache)
    return {
        "version": DOMAIN_VERSION,
        "studies": int(cache.series(None, patient_ids=patient_ids)["study_id"].nunique()),
        "planes": planes,
    }


def _plane_record(rows, cache) -> dict:
    records = rows.to_dict("records")
    facts = [header_facts(row) for row in records]
    pixel = [v for row in records for v in (_number(row.get("spacing_row")), _number(row.get("spacing_col")))
             if v is not None]
    thickness = [v for v in (_number(row.get("spacing_slice")) for row in records) if v is not None]
    return {
        "series": len(records),
        "contrasts": _counts(f["contrast"] for f in facts),
        "fat_suppressed": _counts({True: "yes", False: "no", None: None}[f["fat_suppressed"]] for f in facts),
        "field_strengths": _counts(None if f["field_strength"] is None else f"{f['field_strength']:g}" for f in facts),
        "sites": _counts(f["site"] for f in facts),
        "manufacturers": _counts(f["manufacturer"] for f in facts),
        "pixel_spacing": _range(pixel),
        "slice_thickness": _range(thickness),
        "intensity": _intensity_record(rows, cache),
    }


def _intensity_record(rows, cache) -> dict:
    """Median, robust spread and range of each voxel quantile over the training plane tensors
    (at most ``MAX_INTENSITY_SERIES``, evenly spread over the series ids)."""
    ids = sorted(map(str, rows["series_id"]))
    if len(ids) > MAX_INTENSITY_SERIES:
        ids = [ids[i] for i in np.linspace(0, len(ids) - 1, MAX_INTENSITY_SERIES).round().astype(int)]
    table = np.array([intensity_quantiles(cache.image(series_id)) for series_id in ids])
    median = np.median(table, axis=0)
    scale = 1.4826 * np.median(np.abs(table - median), axis=0)
    return {
        "quantiles": list(INTENSITY_QUANTILES),
        "series": len(ids),
        "median": _rounded(median),
        "scale": _rounded(scale),
        "low": _rounded(table.min(axis=0)),
        "high": _rounded(table.max(axis=0)),
    }


# ------------------------------------------------------------------------- comparing
def compare_series(record: Mapping | None, row: Mapping, affine, image: np.ndarray) -> list[str]:
    """Plain-word notes on how one input series (its manifest-like ``row``, voxel -> RAS
    ``affine`` and plane tensor ``image``) differs from its plane's training ``record``."""
    if record is None:
        return ["no training series of this plane; the pipeline predicts it from other planes' training"]
    facts = header_facts(row)
    pixel, thickness = voxel_spacing(affine)
    notes = [
        _unseen_contrast(record, facts["contrast"]),
        _unseen_fat_suppression(record, facts["fat_suppressed"]),
        _unseen_value("field strength", facts["field_strength"], record.get("field_strengths"), unit=" T"),
        _unseen_value("manufacturer", facts["manufacturer"], record.get("manufacturers")),
        _unseen_value("site", facts["site"], record.get("sites")),
        _far_spacing("pixel spacing", pixel, record.get("pixel_spacing")),
        _far_spacing("slice thickness", [thickness], record.get("slice_thickness")),
        _far_intensities(record.get("intensity"), intensity_quantiles(image)),
    ]
    return [note for note in notes if note]


def study_notes(domain: Mapping | None, series: Mapping, rows: Mapping) -> dict | None:
    """{plane: [notes]} for every predicted plane of a study (``series``: {plane: SeriesPrediction},
    ``rows``: {plane: manifest-like row}); None when the pipeline records no training domain."""
    if domain is None:
        return None
    planes = domain.get("planes") or {}
    return {plane: compare_series(planes.get(plane), rows.get(plane) or {}, item.source_affine, item.image_tensor)
            for plane, item in series.items()}


def notes_text(notes: Mapping | None) -> str:
    """One CSV cell: "plane: note; plane: note" ("" when nothing differs or nothing was compared)."""
    return "; ".join(f"{plane}: {note}" for plane, items in (notes or {}).items() for note in items)


def _unseen_contrast(record: Mapping, contrast: str | None) -> str | None:
    seen = [name for name in record.get("contrasts") or {} if name not in UNKNOWN_CONTRASTS]
    if contrast is None or not seen or contrast in seen:
        return None
    return f"contrast {contrast}, but the training series were {_listed(seen)}"


def _unseen_fat_suppression(record: Mapping, suppressed: bool | None) -> str | None:
    seen = set(record.get("fat_suppressed") or {})
    wanted = "yes" if suppressed else "no"
    if suppressed is None or not seen or wanted in seen:
        return None
    if suppressed:
        return "fat-suppressed, but no training series was"
    return "not fat-suppressed, but every training series was"


def _unseen_value(what: str, value, seen, unit: str = "") -> str | None:
    names = list(seen or {})
    if value is None or not names:
        return None
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if shown.strip().lower() in {name.strip().lower() for name in names}:
        return None
    return f"{what} {shown}{unit}, never seen in training ({_listed(names, unit)})"


def _far_spacing(what: str, values: list[float], seen) -> str | None:
    if not seen:
        return None
    low, high = float(seen[0]), float(seen[1])
    if not any(v > high * SPACING_FACTOR or v < low / SPACING_FACTOR for v in values):
        return None
    shown = " x ".join(f"{v:.2f}" for v in values)
    return (f"{what} {shown} mm, far outside the training range {low:.2f}-{high:.2f} mm "
            f"(more than {SPACING_FACTOR:g} times beyond it)")


def _far_intensities(record: Mapping | None, found: list[float]) -> str | None:
    if not record:
        return None
    far = []
    for q, value, median, scale, low, high in zip(record["quantiles"], found, record["median"], record["scale"],
                                                  record["low"], record["high"]):
        z = (value - median) / max(float(scale), MIN_INTENSITY_SCALE)
        outside = value < low - INTENSITY_MARGIN or value > high + INTENSITY_MARGIN
        if outside and abs(z) > INTENSITY_Z:
            far.append((abs(z), q, value, low, high, z))
    if not far:
        return None
    _, q, value, low, high, z = max(far)
    return (f"image intensities unlike the training scans: the {q * 100:g}th percentile of the scaled image is "
            f"{value:.2f}, training {low:.2f} to {high:.2f} ({abs(z):.1f} robust SDs from their median, "
            f"bound {INTENSITY_Z:g})")


# ------------------------------------------------------------------------- small parts
def _counts(values) -> dict:
    counted = Counter(v for v in values if v is not None)
    return {str(key): int(n) for key, n in sorted(counted.items(), key=lambda item: (-item[1], str(item[0])))}


def _range(values: list[float]) -> list[float] | None:
    return [round(min(values), 4), round(max(values), 4)] if values else None


def _rounded(values) -> list[float]:
    return [round(float(v), 5) for v in values]


def _listed(names, unit: str = "") -> str:
    names = list(names)
    shown = ", ".join(f"{name}{unit}" for name in names[:LISTED_VALUES])
    return shown + (f" and {len(names) - LISTED_VALUES} more" if len(names) > LISTED_VALUES else "")


def _tesla(value: float) -> float:
    return round(float(value), 1)


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
