"""Pretraining for the benches: a separate unlabeled archive, and one cached pretraining per config
and data, shared by every bench that asks for the same one.

The unlabeled archive of a joint is synthesized with its own seed, and its patient and study ids
carry the ``U-`` prefix, so no patient of it can be a patient of the labeled splits; its labels are
dropped (pretraining never reads them). ``prepare_pool`` asserts the disjointness and that the pool
holds at least ``MIN_POOL_RATIO`` times the labeled training patients.

Layout under the cache root (``<bench out>/../pretrain-cache`` unless the preset's
``pretrain_cache`` names one): ``unlabeled-<joint>-<key>/`` (archive, manifest, cache) and
``<sha256 of the pretraining config and its data>/denoisers/<plane>``. A second bench with the same
pretraining finds the denoisers there and pretrains nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ...config import ExperimentConfig
from ...errors import OrthodiffError
from ...fileio import write_json, write_table
from ..presets import BenchPreset

log = logging.getLogger(__name__)

POOL_SEED = 1  # the labeled archives use seed 0
POOL_PREFIX = "U-"
MIN_POOL_RATIO = 5  # unlabeled patients per labeled training patient, at least
# pretraining settings that change what is learned (others: logging, where files go, resuming)
_IGNORED_PRETRAIN_KEYS = ("output_dir", "resume", "log_every", "preview_every", "preview_count", "tracker",
                          "checkpoint_every", "keep_checkpoints")


@dataclass
class Pool:
    joint: str
    root: Path
    config: ExperimentConfig  # data paths of the pool; everything else as the labeled joint's config

    @property
    def manifest(self) -> Path:
        return Path(self.config.data.manifest)


def cache_root(preset: BenchPreset, out: Path) -> Path:
    return Path(preset.pretrain_cache) if preset.pretrain_cache else Path(out).resolve().parent / "pretrain-cache"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def pool_key(joint: str, studies: int, matrix: int, data) -> str:
    """The unlabeled pool's folder key: what its archive and prepared cache depend on."""
    settings = {"joint": joint, "studies": studies, "seed": POOL_SEED, "matrix": matrix,
                "plane_size": data.plane_size, "slab": data.slab, "slice_spacing": data.slice_spacing}
    if data.field_of_view_mm:  # only a crop enters the key, so the uncropped pools keep theirs
        settings["field_of_view_mm"] = dict(data.field_of_view_mm)
    return _digest(settings)[:16]


def prepare_pool(preset: BenchPreset, out: Path, joint: str, labeled_config: ExperimentConfig) -> Pool:
    """Synthesize, scan (ids prefixed, labels dropped) and prepare ``joint``'s unlabeled archive;
    each stage resumes. Shared by every bench under the same cache root."""
    from ...data.scan import scan_archive
    from ...synth import synthesize_archive
    from .workspace import prepare_planes

    studies = int(preset.unlabeled_studies.get(joint, 0))
    if studies <= 0:
        raise OrthodiffError(f"bench preset {preset.name!r}: unlabeled_studies has no {joint} count; pretraining "
                             f"needs a separate unlabeled archive (e.g. unlabeled_studies={{{joint}: 600}})")
    data = labeled_config.data
    root = cache_root(preset, out) / f"unlabeled-{joint}-{pool_key(joint, studies, int(preset.matrix), data)}"
    config = replace(labeled_config, data=replace(
        data, archive=str(root / "archive"), manifest=str(root / "manifest.parquet"), cache=str(root / "cache"),
        splits=str(root / "splits.json")))
    archive = root / "archive"
    if not (archive / "archive.json").exists():
        log.info("synthesizing %d unlabeled %s studies", studies, joint)
        synthesize_archive(archive, joint=joint, studies=studies, seed=POOL_SEED, matrix=int(preset.matrix),
                           progress=False)
    manifest = root / "manifest.parquet"
    if not manifest.exists():
        scanned = root / "scanned.parquet"
        scan_archive(archive, scanned)
        write_table(manifest, _unlabeled(scanned))
        scanned.unlink()
    prepare_planes(config)
    return Pool(joint=joint, root=root, config=config)


def _unlabeled(manifest: Path):
    """The scanned manifest with prefixed patient and study ids and no label values."""
    import numpy as np

    from ...data.manifest import label_columns, read_manifest

    frame = read_manifest(manifest)
    for column in ("patient_id", "study_id"):
        frame[column] = POOL_PREFIX + frame[column].astype(str)
    for column in label_columns(frame):
        frame[column] = np.nan
    return frame


def pool_patients(pool: Pool, exclude: tuple[str, object] | None = None) -> list[str]:
    """The pool's patients; ``exclude`` = (site | field_strength, value) leaves that domain out."""
    import pandas as pd

    from ...data.manifest import read_manifest

    frame = read_manifest(pool.manifest).drop_duplicates("study_id")
    if exclude is not None:
        column, held_out = exclude
        if column == "field_strength":
            held = pd.to_numeric(frame[column], errors="coerce").sub(float(held_out)).abs().lt(1e-6)
        else:
            held = frame[column].astype(str).eq(str(held_out))
        held_patients = set(frame.loc[held, "patient_id"].astype(str))
        frame = frame[~frame["patient_id"].astype(str).isin(held_patients)]
    return sorted(frame["patient_id"].astype(str).unique())


def check_pool(pool_ids: list[str], labeled_manifest: Path, train_patients: list[str], source: str,
               held_out: int = 0) -> dict:
    """Assert that no pool patient is a labeled patient and that the patients pretraining learns from
    (the pool less the ``held_out`` ones that only score its denoising loss) are at least
    ``MIN_POOL_RATIO`` x the labeled training patients; returns the counts for the report."""
    from ...data.manifest import read_manifest

    labeled = set(read_manifest(labeled_manifest)["patient_id"].astype(str))
    shared = sorted(set(pool_ids) & labeled)
    if shared:
        raise OrthodiffError(f"{source}: {len(shared)} unlabeled patient(s) are also labeled patients (e.g. "
                             f"{shared[0]!r}); the unlabeled archive must hold other patients")
    trained = len(pool_ids) - int(held_out)
    if trained < MIN_POOL_RATIO * len(train_patients):
        raise OrthodiffError(
            f"{source}: pretraining learns from {trained} unlabeled patients for {len(train_patients)} labeled "
            f"training patients; the protocol needs at least {MIN_POOL_RATIO}x: raise unlabeled_studies")
    return {"unlabeled_patients": len(pool_ids), "held_out_patients": int(held_out), "trained_patients": trained,
            "labeled_train_patients": len(train_patients),
            "ratio": round(trained / max(1, len(train_patients)), 2), "disjoint": True}


def pretrain_key(config: ExperimentConfig, patients: list[str], cache_fingerprint: str) -> str:
    """sha256 of what a pretraining learns from: the network, the pretraining settings, the seed and
    its data (the pool's patients and the prepared cache's settings)."""
    settings = {k: v for k, v in asdict(config.pretrain).items() if k not in _IGNORED_PRETRAIN_KEYS}
    if not settings.get("patch_size"):  # whole planes, however spelled (null or {}), keep the key they always had
        settings.pop("patch_size", None)
    return _digest({"model": asdict(config.model), "pretrain": settings, "seed": int(config.seed),
                    "patients": sorted(patients), "cache": cache_fingerprint})


def _cache_fingerprint(cache: Path) -> str:
    """The prepared cache's settings and series (not its file dates)."""
    import pandas as pd

    meta = json.loads((cache / "cache.json").read_text())
    meta.pop("created", None)
    index = pd.read_parquet(cache / "index.parquet")
    return _digest({"cache": meta, "series": sorted(index["series_id"].astype(str))})


def cached_pretraining(pool: Pool, preset: BenchPreset, out: Path, patients: list[str], name: str = "all") -> Path:
    """Denoisers pretrained on ``patients`` of the pool, from the shared cache or pretrained now
    (resumable) into it. Returns the folder holding ``denoisers/<plane>``."""
    from ...planes import PLANES
    from .workspace import pretrain

    key = pretrain_key(pool.config, patients, _cache_fingerprint(Path(pool.config.data.cache)))
    folder = cache_root(preset, out) / key
    folder.mkdir(parents=True, exist_ok=True)
    if all((folder / "denoisers" / p / "config.json").exists() for p in PLANES):
        log.info("pretraining %s found in the cache: %s", name, folder)
        return folder
    splits = folder / "pool-splits.json"
    if not splits.exists():
        write_pool_splits(pool, patients, splits)
    with _lock(folder):
        pretrain(pool.config, splits, folder)
    write_json(folder / "pretrain-cache.json", {"key": key, "joint": pool.joint, "pool": str(pool.root),
                                                "patients": len(patients), "name": name})
    return folder


def write_pool_splits(pool: Pool, patients: list[str], out: Path) -> Path:
    """A splits file of the pool's manifest whose training patients are ``patients``; the others (a
    held-out domain) sit in test. With a held-out pretraining loss (``pretrain.eval_every`` > 0),
    ``pretrain.eval_volumes`` of ``patients``, drawn with the pool's seed, sit in val instead: scored,
    never trained on. Made from the whole manifest, so its data fingerprint matches the pool's cache."""
    from ...data.manifest import read_manifest
    from ...data.splits import load_splits, make_splits
    from ...fileio import read_json

    draft = out.with_name(out.name + ".draft.json")
    draft.unlink(missing_ok=True)
    make_splits(read_manifest(pool.manifest), draft, seed=int(pool.config.seed), val_fraction=0.0,
                test_fraction=0.0, fractions=[1.0])
    stored = read_json(draft)
    chosen = sorted(set(patients))
    rest = sorted(set(stored["train"]) - set(chosen))
    held_out = heldout_patients(chosen, pool.config)
    train = sorted(set(chosen) - set(held_out))
    stored.update(train=train, val=held_out, test=rest, subsets={"1": train}, val_subsets={"1": held_out},
                  label_positives={}, pretraining_pool={"patients": len(train), "held_out": len(held_out),
                                                        "left_out": len(rest)})
    write_json(out, stored)
    draft.unlink()
    load_splits(out)  # checks disjointness
    return out


def heldout_patients(patients: list[str], config: ExperimentConfig) -> list[str]:
    """The pool patients whose denoising loss is scored during pretraining (none when it is off)."""
    import random

    if int(config.pretrain.eval_every) <= 0:
        return []
    count = min(int(config.pretrain.eval_volumes), len(patients) // 10)
    return sorted(random.Random(int(config.seed)).sample(sorted(patients), count))


def pool_pretraining(preset: BenchPreset, out: Path, joint: str, config: ExperimentConfig, labeled: list,
                     exclude: tuple[str, object] | None = None, name: str = "all") -> tuple[Path, dict]:
    """Denoisers pretrained on ``joint``'s unlabeled pool (less the ``exclude`` domain), after checking
    the pool against the labeled data it serves: ``labeled`` = [(manifest, splits file), ...].

    ``config`` is the labeled joint's bench config (network, pretraining, plane size). Returns the
    denoisers' folder and the pool's counts (for results.json and the report).
    """
    from ...data.splits import load_splits

    pool = prepare_pool(preset, out, joint, config)
    patients = pool_patients(pool, exclude)
    counts = {}
    for manifest, splits in labeled:
        counts = check_pool(patients, Path(manifest), load_splits(splits).train, str(pool.root),
                            held_out=len(heldout_patients(patients, config)))
    folder = cached_pretraining(pool, preset, out, patients, name)
    return folder, {**counts, "joint": joint, "pretraining": str(folder), "pool": str(pool.root)}


class _lock:
    """An exclusive lock file, so two benches never pretrain the same cache entry at once (the
    second waits, then finds the denoisers)."""

    def __init__(self, folder: Path, poll: float = 10.0):
        self.path, self.poll = Path(folder) / ".lock", poll

    def __enter__(self):
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                if not _alive(self.path):
                    self.path.unlink(missing_ok=True)  # left by a process that died
                    continue
                log.info("waiting for another bench pretraining into %s", self.path.parent)
                time.sleep(self.poll)

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid()


__all__ = ["Pool", "cache_root", "cached_pretraining", "check_pool", "heldout_patients", "pool_patients", "pool_pretraining", "prepare_pool",
           "pretrain_key"]
