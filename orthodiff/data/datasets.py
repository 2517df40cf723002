"""Torch datasets over a prepared cache: plane volumes for pretraining, studies for fine-tuning."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import OrthodiffError
from ..planes import PLANES, check_plane
from .cache import PlaneCache

DEFAULT_EHR_COLUMNS = ("age", "sex", "height", "weight")
_SEX_CODES = {"m": 1.0, "male": 1.0, "f": 0.0, "female": 0.0}


def _open(cache) -> PlaneCache:
    return cache if isinstance(cache, PlaneCache) else PlaneCache(cache)


def _as_float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


class PlaneVolumeDataset(Dataset):
    """Every prepared series of one plane (of the given patients): float32 tensors (1, D, H, W).

    ``augment``, when given, is called on each tensor and must return a tensor of the same shape.

    ``patch_size`` (D, H, W), when given, makes each item a crop of that size drawn uniformly inside
    the volume (MONAI ``RandSpatialCrop``, never padding outside it). Items are then addressed as
    ``(index, draw)``, ``draw`` a tuple of integers that, with ``seed``, fixes where the crop lies:
    the same key gives the same crop in any process and on any run.
    """

    def __init__(
        self,
        cache,
        plane: str,
        patient_ids=None,
        augment: Callable | None = None,
        patch_size: Sequence[int] | None = None,
        seed: int = 0,
    ):
        self.cache = _open(cache)
        self.plane = check_plane(plane)
        self.augment = augment
        self.series_ids = sorted(self.cache.series(plane, patient_ids)["series_id"])
        if not self.series_ids:
            raise OrthodiffError(f"{self.cache.root}: no prepared {plane} series for the requested patients")
        self.patch_size = self._check_patch_size(patch_size)
        self.seed = int(seed)
        self._cropper = None
        if self.patch_size is not None:
            from monai.transforms import RandSpatialCrop

            self._cropper = RandSpatialCrop(self.patch_size, random_size=False)

    def _check_patch_size(self, patch_size) -> tuple[int, int, int] | None:
        if patch_size is None:
            return None
        size = tuple(int(s) for s in patch_size)
        volume = tuple(int(s) for s in self.cache.plane_size[self.plane])
        if len(size) != 3 or any(s < 1 for s in size) or any(s > v for s, v in zip(size, volume)):
            raise OrthodiffError(
                f"patch_size {list(patch_size)}: does not fit inside the {self.plane} volumes {list(volume)} of "
                f"{self.cache.root}; give three sizes no larger than the volume's"
            )
        return size

    def __len__(self) -> int:
        return len(self.series_ids)

    def __getitem__(self, key) -> torch.Tensor:
        index, draw = key if isinstance(key, tuple) else (key, None)
        image = _as_float32(self.cache.image(self.series_ids[index]))
        if self.patch_size is not None:
            image = self._crop(image, draw)
        return self.augment(image) if self.augment is not None else image

    def _crop(self, image: torch.Tensor, draw) -> torch.Tensor:
        if draw is None:
            raise OrthodiffError(
                f"PlaneVolumeDataset with patch_size {list(self.patch_size)}: address items as (index, draw) so "
                "each crop is seeded; a bare index has no crop position"
            )
        # A fresh state per item: the crop depends on its key alone, not on what was read before.
        state = np.random.RandomState(np.random.SeedSequence([self.seed, *(int(d) for d in draw)]).generate_state(4))
        self._cropper.set_random_state(state=state)
        cropped = self._cropper(image)
        return (cropped.as_tensor() if hasattr(cropped, "as_tensor") else cropped).contiguous()


class StudyDataset(Dataset):
    """One item per study: up to three planes with a presence mask, labels, EHR and segmentations.

    Item keys: ``study_id``, ``patient_id``, ``images`` {plane: float32 (1, D, H, W), zeros when
    absent}, ``present`` bool (3,) in PLANES order, ``labels`` float32 (L,) (NaN unknown), ``ehr``
    float32 (E,) = standardised values then one missing flag per column (``ehr_names``), ``meta``
    {site, field_strength}; with ``with_segmentation`` also ``segs`` {plane: int64 (D, H, W)} and
    ``seg_present`` bool (3,).

    EHR: numeric columns are standardised with ``ehr_stats`` ({column: (mean, std)}) if given, else
    with the mean and std over this dataset's studies (pass ``train_dataset.ehr_stats`` to the
    validation set); sex is 1 for M, 0 for F; a missing value is 0 with its flag set to 1.

    ``augment``, when given, is called on a dict {plane: image (1, D, H, W)} of the present planes,
    plus ``"<plane>_seg"``: int64 (1, D, H, W) for each present segmentation when
    ``with_segmentation``, and must return the same keys (e.g. a torchio Compose wrapped for dicts).
    A study's series for a plane is the first in sorted series_id order (several echoes).
    Studies that have none of ``planes`` are left out.
    """

    def __init__(
        self,
        cache,
        patient_ids=None,
        labels: Sequence[str] = (),
        planes: Sequence[str] = PLANES,
        ehr_columns: Sequence[str] = DEFAULT_EHR_COLUMNS,
        with_segmentation: bool = False,
        augment: Callable | None = None,
        ehr_stats: dict | None = None,
    ):
        self.cache = _open(cache)
        self.planes = tuple(check_plane(p, "planes") for p in planes)
        self.with_segmentation = with_segmentation
        self.augment = augment
        self.labels = [name[len("label_") :] if name.startswith("label_") else name for name in labels]
        rows = self.cache.series(patient_ids=patient_ids)
        rows = rows[rows["plane"].isin(self.planes)].sort_values("series_id")
        self._check_columns(rows, list(ehr_columns))
        self.ehr_columns = list(ehr_columns)

        first = rows.drop_duplicates(["study_id", "plane"])  # first series per (study, plane)
        self.study_ids = sorted(first["study_id"].unique())
        self._series = {(r.study_id, r.plane): r.series_id for r in first.itertuples()}
        self._study_rows = rows.drop_duplicates("study_id").set_index("study_id")
        self.ehr_stats = ehr_stats if ehr_stats is not None else self._fit_ehr_stats()
        self.ehr_names = self.ehr_columns + [f"{column}_missing" for column in self.ehr_columns]
        self.plane_size = self.cache.plane_size

    def _check_columns(self, rows, ehr_columns: list[str]) -> None:
        missing_labels = [n for n in self.labels if f"label_{n}" not in rows.columns]
        if missing_labels:
            raise OrthodiffError(
                f"{self.cache.root}: labels {missing_labels} are not in the cache index; check data.labels"
            )
        missing_ehr = [c for c in ehr_columns if c not in rows.columns]
        if missing_ehr:
            raise OrthodiffError(
                f"{self.cache.root}: EHR columns {missing_ehr} are not in the cache index; check data.ehr_columns"
            )
        if rows.empty:
            raise OrthodiffError(
                f"{self.cache.root}: no prepared series of planes {list(self.planes)} for these patients"
            )

    def _fit_ehr_stats(self) -> dict:
        stats = {}
        for column in self.ehr_columns:
            if column == "sex":
                continue
            values = np.array([_number(v) for v in self._study_rows[column]], dtype=np.float64)
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size > 1 else 1.0
            stats[column] = (mean, std if std > 1e-8 else 1.0)
        return stats

    def _ehr(self, row) -> torch.Tensor:
        return encode_ehr(row, self.ehr_columns, self.ehr_stats)

    def study_row(self, study_id: str):
        """The study's metadata and labels (its first index row), without reading any image."""
        return self._study_rows.loc[study_id]

    def encode_ehr(self, row) -> torch.Tensor:
        """The ``ehr`` vector of an index row (``ehr_names`` order)."""
        return self._ehr(row)

    def series_of(self, study_id: str, plane: str) -> str | None:
        """The series used for ``plane`` of the study, or None when the study lacks that plane."""
        return self._series.get((study_id, plane))

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> dict:
        study_id = self.study_ids[index]
        row = self._study_rows.loc[study_id]
        images, segs, present, seg_present = {}, {}, [], []
        for plane in PLANES:
            series_id = self._series.get((study_id, plane)) if plane in self.planes else None
            present.append(series_id is not None)
            seg = self.cache.seg(series_id) if series_id is not None and self.with_segmentation else None
            seg_present.append(seg is not None)
            if plane not in self.planes:
                continue
            shape = self.plane_size[plane]
            images[plane] = _as_float32(self.cache.image(series_id)) if series_id else torch.zeros((1, *shape))
            if self.with_segmentation:
                segs[plane] = (
                    torch.from_numpy(np.array(seg[0], dtype=np.int64))
                    if seg is not None
                    else torch.zeros(shape, dtype=torch.int64)
                )
        if self.augment is not None:
            images, segs = self._augment(images, segs, present, seg_present)
        item = {
            "study_id": study_id,
            "patient_id": str(row["patient_id"]),
            "images": images,
            "present": torch.tensor(present, dtype=torch.bool),
            "labels": torch.tensor([_number(row[f"label_{n}"]) for n in self.labels], dtype=torch.float32),
            "ehr": self._ehr(row),
            "meta": {"site": _text(row.get("site")), "field_strength": _number(row.get("field_strength"))},
        }
        if self.with_segmentation:
            item["segs"] = segs
            item["seg_present"] = torch.tensor(seg_present, dtype=torch.bool)
        return item

    def _augment(self, images: dict, segs: dict, present: list, seg_present: list):
        sample = {p: images[p] for p in self.planes if present[PLANES.index(p)]}
        sample.update({f"{p}_seg": segs[p][None] for p in segs if seg_present[PLANES.index(p)]})
        result = self.augment(sample)
        for key, value in result.items():
            if key.endswith("_seg"):
                segs[key[: -len("_seg")]] = value[0].long()
            else:
                images[key] = value.float()
        return images, segs


def collate_studies(items: list[dict]) -> dict:
    """Stack StudyDataset items: images {plane: (B, 1, D, H, W)}, present (B, 3), labels (B, L) ..."""
    if not items:
        raise OrthodiffError("collate_studies: empty batch")
    batch = {
        "study_id": [item["study_id"] for item in items],
        "patient_id": [item["patient_id"] for item in items],
        "images": {plane: torch.stack([item["images"][plane] for item in items]) for plane in items[0]["images"]},
        "present": torch.stack([item["present"] for item in items]),
        "labels": torch.stack([item["labels"] for item in items]),
        "ehr": torch.stack([item["ehr"] for item in items]),
        "meta": {
            "site": [item["meta"]["site"] for item in items],
            "field_strength": torch.tensor([item["meta"]["field_strength"] for item in items], dtype=torch.float32),
        },
    }
    if "segs" in items[0]:
        batch["segs"] = {plane: torch.stack([item["segs"][plane] for item in items]) for plane in items[0]["segs"]}
        batch["seg_present"] = torch.stack([item["seg_present"] for item in items])
    return batch


def encode_ehr(values, columns: Sequence[str], stats: dict) -> torch.Tensor:
    """(2 x len(columns),) float32: each column's value (numeric ones standardised with ``stats``
    {column: (mean, std)}; sex 1 for M, 0 for F), then one missing flag per column. A missing or
    unreadable value is 0 with its flag 1. ``values``: a mapping or an index row; training and
    prediction both encode through here."""
    encoded, flags = [], []
    for column in columns:
        raw = values.get(column) if hasattr(values, "get") else None
        if column == "sex":
            value = _SEX_CODES.get(str(raw).strip().lower(), math.nan)
        else:
            mean, std = stats.get(column, (0.0, 1.0))
            value = (_number(raw) - mean) / std
        missing = not math.isfinite(value)
        encoded.append(0.0 if missing else value)
        flags.append(1.0 if missing else 0.0)
    return torch.tensor(encoded + flags, dtype=torch.float32)


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
