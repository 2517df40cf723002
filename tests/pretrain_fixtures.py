"""Small prepared caches for the pretraining tests, written by hand to the cache contract.

Volumes are smooth synthetic blobs (a few Gaussian bumps on a gradient), float16 in [-1, 1],
so a tiny denoiser can learn their distribution in a few dozen CPU steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from orthodiff.config import ExperimentConfig, load_config
from orthodiff.fileio import write_json, write_table
from orthodiff.planes import PLANES

TINY_SIZE = (8, 16, 16)


def smooth_volume(rng: np.random.Generator, size: Sequence[int]) -> np.ndarray:
    """A (D, H, W) volume in [-1, 1]: two or three Gaussian bumps on a linear ramp."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij")
    volume = 0.3 * sum(rng.uniform(-1, 1) * g for g in grids)
    for _ in range(rng.integers(2, 4)):
        centre = rng.uniform(-0.6, 0.6, size=3)
        width = rng.uniform(0.25, 0.5)
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre))
        volume = volume + rng.uniform(0.8, 1.5) * np.exp(-distance / (2 * width**2))
    volume = volume - volume.min()
    return (2 * volume / max(volume.max(), 1e-6) - 1).astype(np.float32)


def write_fixture_cache(
    root: Path,
    patients: int = 6,
    size: Sequence[int] = TINY_SIZE,
    planes: Sequence[str] = PLANES,
    seed: int = 0,
    nan_patient: str | None = None,
) -> Path:
    """Write CACHE/cache.json, index.parquet and images/*.npy for ``patients`` one-study patients."""
    import pandas as pd

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(1, patients + 1):
        patient_id, study_id = f"P{number:04d}", f"knee-{number:04d}"
        for plane in planes:
            series_id = f"{study_id}/{plane}"
            image = smooth_volume(rng, size)[None]
            if patient_id == nan_patient:
                image[:] = np.nan
            name = f"images/{series_id.replace('/', '__')}.npy"
            np.save(root / name, image.astype(np.float16))
            rows.append(
                {"series_id": series_id, "study_id": study_id, "patient_id": patient_id, "plane": plane,
                 "image": name, "seg": "", "source_shape": "[]", "source_affine": "[]", "tensor_affine": "[]"}
            )
    write_table(root / "index.parquet", pd.DataFrame(rows))
    write_json(root / "cache.json", {"format_version": 1, "plane_size": {p: list(size) for p in PLANES}, "manifest": ""})
    return root


def write_splits(path: Path, train: list[str], val: list[str], test: list[str]) -> Path:
    """A splits file in the format of ``orthodiff split`` (patient ids per split)."""
    write_json(
        path,
        {"train": train, "val": val, "test": test, "subsets": {"1.0": train}, "settings": {"labels": [], "seed": 0}},
    )
    return Path(path)


def tiny_config(cache: Path, output_dir: Path, *overrides: str) -> ExperimentConfig:
    """A tiny denoiser (base 8, mult 1,2) at 8 x 16 x 16 on CPU, no tracker, no previews."""
    size = list(TINY_SIZE)
    return load_config(
        ["tiny"],
        [
            f"data.cache={cache}",
            f"data.splits={Path(cache) / 'no-splits.json'}",
            *(f"data.plane_size.{p}=[{size[0]},{size[1]},{size[2]}]" for p in PLANES),
            "model.base_channels=8",
            "model.channel_mult=[1,2]",
            "model.attention_levels=[false,true]",
            "model.num_head_channels=8",
            "model.norm_num_groups=8",
            f"pretrain.output_dir={output_dir}",
            "pretrain.plane=sagittal",
            "pretrain.max_steps=4",
            "pretrain.warmup_steps=1",
            "pretrain.checkpoint_every=2",
            "pretrain.log_every=1",
            "pretrain.preview_every=0",
            "pretrain.tracker=none",
            *overrides,
        ],
    )


def preempt_after_checkpoint(monkeypatch, cfg: ExperimentConfig, step: int) -> None:
    """Run pretraining with ``cfg`` until it has written its step-``step`` checkpoint, then stop it as a
    preempted job stops (a KeyboardInterrupt right after the checkpoint)."""
    import pytest

    from orthodiff.training import pretrain

    original = pretrain.save_checkpoint

    def save_then_stop(accelerator, directory, saved_step, *args, **kwargs):
        path = original(accelerator, directory, saved_step, *args, **kwargs)
        if saved_step == step:
            raise KeyboardInterrupt("simulated preemption")
        return path

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run_pretraining(cfg)
    monkeypatch.setattr(pretrain, "save_checkpoint", original)


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline ``run-*.wandb`` file (wandb's leveldb-style record log).

    wandb 0.2x+ has no Python reader for its transaction log, so this follows its documented layout:
    a 7-byte file header, then 32 KiB blocks of records with a 7-byte header (crc, length, type).
    """
    import json as _json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    block, header = 32768, 7
    position, pending, records = header, b"", []
    while position + header <= len(data):
        left_in_block = block - position % block
        if left_in_block < header:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + header])
        chunk = data[position + header : position + header + length]
        position += header + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({("/".join(i.nested_key) or i.key): _json.loads(i.value_json) for i in record.history.item})
    return rows


def one_thread():
    """Generator for a module fixture: torch on one thread (tiny models; CPU shared by many jobs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
