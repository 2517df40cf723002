"""The feature store: denoiser features of every prepared study, cached once, reloaded fast.

Layout under ``features.output_dir``::

    features.json                 what was extracted and how (timesteps, blocks, seed, noise draws,
                                  denoiser fingerprints, cache); written last, so it marks completion
    index.parquet                 plane, series_id, study_id, patient_id, row, cache_sha256
    <plane>/<block>_t<spec>.npy   (N, C, d, h, w), row i = index row i of that plane (memory-mapped)

A store is reused only when it was built exactly as asked; otherwise it is refused with one line.
It is tied to the cache's content: ``cache_sha256`` is the digest of each series' plane tensor as
prepare recorded it, so a store whose studies were prepared again since (a changed source), or one
whose files are incomplete, is extracted again. One extraction at a time writes a store; another
waits for it and then reuses what it wrote.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import npy_is_complete, read_json, read_table, write_json, write_table
from ..locks import exclusive
from ..models.numerics import device_record, exact_float32
from ..planes import PLANES

FORMAT = "orthodiff-features"
VERSION = 1
HEADER = "features.json"
INDEX = "index.parquet"

log = logging.getLogger(__name__)


def study_series(index):
    """One series per (study, plane): the first in sorted series_id order (as StudyDataset does)."""
    ordered = index.sort_values(["study_id", "plane", "series_id"], kind="stable")
    return ordered.drop_duplicates(["study_id", "plane"], keep="first").reset_index(drop=True)


def feature_file(plane: str, block: str, spec: str) -> str:
    return f"{plane}/{block}_t{spec}.npy"


def extraction_spec(cfg, fingerprints: Mapping[str, str], cache_root: Path) -> dict:
    """The settings that determine the stored numbers; a store is reused only if they all match."""
    from ..data.selection import selection_spec

    features = cfg.features
    return {
        **selection_spec(cfg.data.series),
        "timesteps": [int(t) for t in features.timesteps],
        "blocks": list(features.blocks),
        "average_timesteps": bool(features.average_timesteps),
        "noise_draws": int(features.noise_draws),
        "seed": int(cfg.seed),
        "init": cfg.finetune.init,
        "denoisers": dict(fingerprints),
        "cache": str(Path(cache_root).resolve()),
        "dtype": features.dtype,
    }


def run_extraction(cfg) -> Path:
    """Extract features for every prepared study (all splits) into ``cfg.features.output_dir``.

    Reuses a complete store built with the same settings from the same cache tensors; extracts
    again when the tensors changed since or a file of the store is incomplete; refuses a store
    built with other settings (``features.overwrite=true`` rebuilds it).
    """
    import torch

    from ..data.cache import PlaneCache
    from ..data.selection import select_cache
    from .backbones import build_denoisers, denoiser_fingerprint

    out = Path(cfg.features.output_dir)
    if cfg.features.dtype not in ("float16", "float32"):
        raise OrthodiffError(f"features.dtype={cfg.features.dtype!r}: use float16 or float32")
    cache = select_cache(PlaneCache(cfg.data.cache), cfg.data.series)
    cache.check_splits(cfg.data.splits)  # the features will be used with these splits
    series = study_series(cache.index)
    planes = [plane for plane in PLANES if (series["plane"] == plane).any()]
    if not planes:
        raise OrthodiffError(f"{cfg.data.cache}: the cache holds no prepared series; run `orthodiff prepare` first")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoisers = build_denoisers(cfg, planes, cache.plane_size, device=device)
    spec = extraction_spec(cfg, {p: denoiser_fingerprint(d) for p, d in denoisers.items()}, Path(cfg.data.cache))
    series = series.assign(cache_sha256=[cache.content_digest(sid) for sid in series["series_id"]])
    with exclusive(out, "extract", "extraction of features"):
        if _reusable(out, spec, series, bool(cfg.features.overwrite)):
            log.info("features at %s already extracted with these settings; reusing them", out)
            return out
        (out / HEADER).unlink(missing_ok=True)  # the store reads as unfinished until it is whole again
        with exact_float32():
            _extract_into(out, cfg, cache, series, denoisers, spec, device)
    return out


def _reusable(out: Path, spec: dict, series, overwrite: bool) -> bool:
    """Whether the store at ``out`` holds these features of these very tensors, whole. A store of
    other settings is refused unless ``overwrite``; one of changed tensors or with an incomplete file
    is not reusable (and says why)."""
    if not (out / HEADER).exists():
        return False
    header = read_json(out / HEADER)
    if not _same_spec(header.get("spec", {}), spec):
        if overwrite:
            return False
        raise OrthodiffError(
            f"{out}: holds features built with {describe_difference(header.get('spec', {}), spec)}; "
            "set features.output_dir elsewhere or features.overwrite=true"
        )
    damaged = [entry["file"] for entries in header.get("entries", {}).values() for entry in entries.values()
               if not npy_is_complete(out / entry["file"])]
    if damaged:
        log.warning("features at %s: %s is incomplete; extracting them again", out, out / damaged[0])
        return False
    changed = _changed_series(read_table(out / INDEX), series) if (out / INDEX).exists() else ["all"]
    if changed:
        log.warning(
            "features at %s were extracted from other cache tensors for %d series (first: %s); extracting them again",
            out, len(changed), changed[0],
        )
        return False
    return True


def _changed_series(stored, series) -> list:
    """Series whose cache tensor digest differs from the one the store was extracted from, or that
    one side lacks (a store written before digests were kept lacks them all)."""
    if "cache_sha256" not in stored.columns:
        return sorted(series["series_id"])
    before = dict(zip(stored["series_id"].astype(str), stored["cache_sha256"]))
    now = dict(zip(series["series_id"], series["cache_sha256"]))
    return sorted(sid for sid in set(before) | set(now) if before.get(sid) != now.get(sid))


def _extract_into(out: Path, cfg, cache, series, denoisers: dict, spec: dict, device) -> None:
    import torch
    from tqdm.auto import tqdm

    from .extractor import FeatureExtractor

    dtype = np.float16 if cfg.features.dtype == "float16" else np.float32
    index_rows = []
    entries: dict = {}
    batch_size = max(1, int(cfg.features.batch_size))
    for plane, denoiser in denoisers.items():
        rows = series[series["plane"] == plane].reset_index(drop=True)
        extractor = FeatureExtractor(
            denoiser,
            cfg.features.timesteps,
            cfg.features.blocks,
            seed=cfg.seed,
            noise_draws=cfg.features.noise_draws,
            average_timesteps=cfg.features.average_timesteps,
        )
        with _open_arrays(out, plane, extractor, denoiser, len(rows), dtype) as arrays:
            for start in tqdm(range(0, len(rows), batch_size), desc=f"extract {plane}", leave=False):
                chunk = rows.iloc[start : start + batch_size]
                images = torch.from_numpy(
                    np.stack([np.asarray(cache.image(sid), dtype=np.float32) for sid in chunk["series_id"]])
                ).to(device)
                with torch.no_grad():
                    found = extractor(images, list(chunk["study_id"]))
                for key, value in found.items():
                    arrays[key][start : start + len(chunk)] = _to_store(value, dtype)
        for block, name in extractor.feature_keys():
            entries.setdefault(plane, {})[f"{block}@{name}"] = {
                "file": feature_file(plane, block, name),
                "shape": list(denoiser.feature_shape(block)),
            }
        columns = ["series_id", "study_id", "patient_id", "plane", "cache_sha256"]
        index_rows.append(rows[columns].assign(row=np.arange(len(rows))))

    import pandas as pd

    write_table(out / INDEX, pd.concat(index_rows, ignore_index=True))
    write_json(out / HEADER, {"format": FORMAT, "version": VERSION, "spec": spec, "entries": entries,
                              "device": device_record(device)})


class _open_arrays:
    """Memory-mapped .npy files written under unique temporary names, renamed only when all are filled."""

    def __init__(self, out: Path, plane: str, extractor, denoiser, rows: int, dtype):
        self.targets = {
            key: out / feature_file(plane, key[0], key[1]) for key in extractor.feature_keys()
        }
        self.shapes = {key: (rows, *denoiser.feature_shape(key[0])) for key in extractor.feature_keys()}
        self.dtype = dtype

    def __enter__(self):
        self.temps, self.arrays = {}, {}
        for key, target in self.targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.npy", dir=target.parent)
            os.close(handle)
            temp = self.temps[key] = Path(name)
            self.arrays[key] = np.lib.format.open_memmap(temp, mode="w+", dtype=self.dtype, shape=self.shapes[key])
        return self.arrays

    def __exit__(self, kind, value, traceback):
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()  # drop the memory maps before renaming their files
        for key, temp in self.temps.items():
            if kind is None:
                temp.replace(self.targets[key])
            else:
                temp.unlink(missing_ok=True)
        return False


def _to_store(value, dtype) -> np.ndarray:
    array = value.detach().float().cpu().numpy()
    if dtype == np.float16:
        array = np.clip(array, -65000.0, 65000.0)
    return array.astype(dtype)


def _same_spec(saved: dict, wanted: dict) -> bool:
    return {key: saved.get(key) for key in wanted} == wanted


def describe_difference(saved: dict, wanted: dict) -> str:
    """'timesteps [100] (this run: [200]), init pretrained (this run: scratch)' for the fields that differ."""
    names = {"denoisers": "denoiser weights", "cache": "cache", "dtype": "dtype"}
    parts = []
    for key, value in wanted.items():
        if saved.get(key) != value:
            if key == "denoisers":
                parts.append("other denoiser weights (a different checkpoint or init)")
            else:
                parts.append(f"{names.get(key, key)} {saved.get(key)} (this run: {value})")
    return ", ".join(parts) or "other settings"


def describe_spec(spec: dict) -> str:
    parts = [
        f"timesteps {spec.get('timesteps')}",
        f"blocks {spec.get('blocks')}",
        f"seed {spec.get('seed')}",
        f"init {spec.get('init')}",
        f"noise_draws {spec.get('noise_draws')}",
    ]
    if spec.get("average_timesteps"):
        parts.append("averaged over timesteps")
    denoisers = spec.get("denoisers") or {}
    parts.append("denoisers " + ",".join(f"{plane}:{fp[:8]}" for plane, fp in sorted(denoisers.items())))
    return ", ".join(parts)


class FeatureStore:
    """Read side of a store: check it holds what a run needs, then load memory-mapped arrays."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / HEADER).exists():
            raise OrthodiffError(f"{self.root}: no feature store here ({HEADER} missing); run `orthodiff extract` first")
        header = read_json(self.root / HEADER)
        if header.get("format") != FORMAT or int(header.get("version", 0)) > VERSION:
            raise OrthodiffError(f"{self.root / HEADER}: not an orthodiff feature store of version <= {VERSION}")
        self.spec: dict = header["spec"]
        self.entries: dict = header["entries"]
        self.index = read_table(self.root / INDEX)
        for column in ("series_id", "study_id", "patient_id"):
            self.index[column] = self.index[column].astype(str)

    @property
    def planes(self) -> list[str]:
        return [plane for plane in PLANES if plane in self.entries]

    def keys(self) -> list[tuple[str, str]]:
        """(block, timestep spec) pairs held for every plane."""
        per_plane = [{tuple(name.split("@")) for name in self.entries[plane]} for plane in self.planes]
        common = set.intersection(*per_plane) if per_plane else set()
        return sorted(common)

    def require(self, keys: Sequence[tuple[str, str]], fingerprints: Mapping[str, str] | None = None) -> None:
        """Refuse (one line) when a (block, t) is not stored or the denoisers are not the ones asked."""
        held = self.keys()
        for block, spec in keys:
            if (block, spec) not in held:
                raise OrthodiffError(
                    f"{self.root}: feature store was built with {describe_spec(self.spec)} and holds no block "
                    f"{block!r} at t={spec}; run `orthodiff extract` with these features.* into another "
                    "features.output_dir"
                )
        if fingerprints is not None:
            saved = self.spec.get("denoisers", {})
            for plane, fingerprint in fingerprints.items():
                if saved.get(plane) != fingerprint:
                    raise OrthodiffError(
                        f"{self.root}: {plane} features come from another denoiser than finetune.init="
                        f"{self.spec.get('init')} at finetune.pretrained gives; extract them again"
                    )

    def array(self, plane: str, block: str, spec: str) -> np.ndarray:
        """(N, C, d, h, w), memory-mapped; row i belongs to ``rows(plane)`` row i."""
        entry = self.entries.get(plane, {}).get(f"{block}@{spec}")
        if entry is None:
            raise OrthodiffError(f"{self.root}: no {plane} features for block {block!r} at t={spec}")
        path = self.root / entry["file"]
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            state = "is missing" if not path.exists() else "is truncated or damaged"
            raise OrthodiffError(
                f"{path}: this feature file {state}; run `orthodiff extract` again with the same config, "
                "which extracts the store anew"
            ) from None

    def shape(self, plane: str, block: str, spec: str) -> tuple[int, ...]:
        """One study's map shape (C, d, h, w)."""
        return tuple(self.entries[plane][f"{block}@{spec}"]["shape"])

    def rows(self, plane: str):
        return self.index[self.index["plane"] == plane].sort_values("row").reset_index(drop=True)
