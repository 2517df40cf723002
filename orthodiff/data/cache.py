"""Reading a prepared cache: its index, plane size and memory-mapped plane tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import read_json
from ..planes import PLANES


class PlaneCache:
    """A folder written by ``orthodiff prepare`` (see ``orthodiff.data.prepare``)."""

    def __init__(self, root):
        self.root = Path(root)
        meta_path = self.root / "cache.json"
        if not meta_path.exists():
            raise OrthodiffError(
                f"{self.root}: not a prepared cache (no cache.json); run `orthodiff prepare MANIFEST --out {self.root}`"
            )
        self.meta = read_json(meta_path)
        if self.meta.get("format_version") != 1:
            raise OrthodiffError(
                f"{meta_path}: cache format {self.meta.get('format_version')!r} is not 1; prepare it again"
            )
        index_path = self.root / "index.parquet"
        if not index_path.exists():
            raise OrthodiffError(f"{self.root}: no index.parquet; the prepare run did not finish, run it again")
        import pandas as pd

        self.index = pd.read_parquet(index_path)
        self._by_series = {sid: i for i, sid in enumerate(self.index["series_id"])}

    @property
    def plane_size(self) -> dict:
        """``{plane: (D, H, W)}`` the cache was prepared at."""
        return {plane: tuple(int(v) for v in size) for plane, size in self.meta["plane_size"].items()}

    @property
    def slice_spacing(self):
        return self.meta.get("slice_spacing")

    @property
    def fingerprint(self) -> str | None:
        """The data fingerprint of the manifest it was prepared from (None for older caches)."""
        return self.meta.get("manifest_fingerprint")

    def check_splits(self, splits) -> None:
        """Refuse a splits file (``Splits`` or path; a missing path is skipped) made from another manifest."""
        from .fingerprint import check_same_data

        if not hasattr(splits, "fingerprint"):
            if not Path(splits).exists():
                return
            from .splits import load_splits

            splits = load_splits(splits)
        check_same_data(
            self.fingerprint,
            f"{self.root / 'cache.json'} (manifest {self.meta.get('manifest') or 'unknown'})",
            splits.fingerprint,
            f"{splits.path} (manifest {splits.manifest or 'unknown'})",
        )

    @property
    def slab(self) -> str:
        """How slices were fitted to D: crop (the central D; caches before this setting) or fit."""
        return self.meta.get("slab", "crop")

    def check_slab(self, slab: str) -> None:
        """Raise when the run's ``data.slab`` differs from the cache's."""
        if slab != self.slab:
            raise OrthodiffError(
                f"{self.root}: prepared with data.slab={self.slab}, but data.slab={slab} was asked; "
                "prepare a new cache with that setting or use the matching config"
            )

    @property
    def field_of_view_mm(self) -> dict:
        """``{plane: [d, h, w] mm or null}`` of the joint-centred crop; {} when the whole field of view was kept."""
        return self.meta.get("field_of_view_mm") or {}

    def check_field_of_view(self, field_of_view_mm) -> None:
        """Raise when the run's ``data.field_of_view_mm`` differs from the cache's."""
        from .prepare import check_field_of_view

        asked = {plane: list(extent) for plane, extent in check_field_of_view(field_of_view_mm).items()}
        if asked != self.field_of_view_mm:
            raise OrthodiffError(
                f"{self.root}: prepared with data.field_of_view_mm={self.field_of_view_mm or None}, but {asked or None} "
                "was asked; prepare a new cache with that setting or use the matching config"
            )

    def check_plane_size(self, plane_size: dict) -> None:
        """Raise when ``plane_size`` (e.g. a model's) differs from the cache's for any plane it holds
        (a plane the cache has no series of cannot disagree)."""
        held = set(self.index["plane"])
        for plane, size in dict(plane_size).items():
            have = self.plane_size.get(plane) if plane in held else None
            if have is not None and tuple(int(v) for v in size) != have:
                raise OrthodiffError(
                    f"{self.root}: prepared at plane size {list(have)} for {plane}, but {list(size)} was asked; "
                    "prepare a new cache with that data.plane_size or use the matching config"
                )

    def series(self, plane: str | None = None, patient_ids=None):
        """Index rows of one plane (all planes when None) and of the given patients (all when None)."""
        rows = self.index
        if plane is not None:
            if plane not in PLANES:
                raise OrthodiffError(f"plane {plane!r}: use one of {', '.join(PLANES)}")
            rows = rows[rows["plane"] == plane]
        if patient_ids is not None:
            rows = rows[rows["patient_id"].isin(set(map(str, patient_ids)))]
        return rows

    def restrict(self, series_ids) -> None:
        """Keep only these series (``data.series`` selection); lookups of the others then fail."""
        keep = set(map(str, series_ids))
        self.index = self.index[self.index["series_id"].isin(keep)].reset_index(drop=True)
        self._by_series = {sid: i for i, sid in enumerate(self.index["series_id"])}

    def _row(self, series_id: str):
        try:
            return self.index.iloc[self._by_series[series_id]]
        except KeyError:
            raise OrthodiffError(f"{self.root}: series {series_id!r} is not in the cache index") from None

    def image(self, series_id: str) -> np.ndarray:
        """The plane tensor (1, D, H, W), float16, memory-mapped read-only."""
        return self._load(self._row(series_id)["image"])

    def seg(self, series_id: str) -> np.ndarray | None:
        """The segmentation (1, D, H, W), uint8, memory-mapped; None when the series has none."""
        name = self._row(series_id)["seg"]
        return self._load(name) if isinstance(name, str) and name else None

    def check_tensors(self, series_ids) -> None:
        """One line naming the first tensor file of these series that is missing or truncated; a long
        run checks before it starts rather than failing in a data-loading worker hours later."""
        from ..fileio import npy_is_complete

        for series_id in series_ids:
            row = self._row(series_id)
            for name in (row["image"], row["seg"]):
                if isinstance(name, str) and name and not npy_is_complete(self.root / name):
                    raise OrthodiffError(self._damaged(self.root / name))

    def _load(self, name: str) -> np.ndarray:
        """A tensor file of the cache, memory-mapped; one line when it is missing, truncated or damaged."""
        path = self.root / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            raise OrthodiffError(self._damaged(path)) from None

    def _damaged(self, path: Path) -> str:
        state = "is missing" if not path.exists() else "is truncated or damaged"
        return (
            f"{path}: this cache tensor {state}; run `orthodiff prepare MANIFEST --out {self.root}` again, "
            "which prepares it anew"
        )

    def content_digest(self, series_id: str) -> str:
        """The sha256 of the series' tensor file as prepare recorded it (read from the file for a cache
        prepared before digests were recorded); feature stores compare it to notice a tensor made anew."""
        from ..fileio import sha256_file

        row = self._row(series_id)
        digest = row.get("image_sha256")
        return digest if isinstance(digest, str) and digest else sha256_file(self.root / row["image"])

    def geometry(self, series_id: str) -> dict:
        """Source shape and affine, the plane tensor's affine and the field-of-view crop box (source
        voxel indices (start, end); None when uncropped), for ``to_source_geometry``."""
        row = self._row(series_id)
        crop_box = row.get("crop_box")
        return {
            "source_shape": tuple(json.loads(row["source_shape"])),
            "source_affine": np.asarray(json.loads(row["source_affine"])),
            "tensor_affine": np.asarray(json.loads(row["tensor_affine"])),
            "crop_box": tuple(map(tuple, json.loads(crop_box))) if isinstance(crop_box, str) and crop_box else None,
        }

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"PlaneCache({str(self.root)!r}, {len(self)} series, plane_size={self.plane_size})"
