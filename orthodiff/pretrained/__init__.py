"""Denoisers that ship with the package: pretrained by the ``small`` label-fraction bench on its
synthetic unlabeled knee archive, so the demo reads features of a real pretraining in minutes.

``knee-small/`` holds ``denoisers/<plane>`` (the exported EMA weights, as ``orthodiff pretrain``
writes them) and ``provenance.json``: the commands that made them, the pretraining's cache key,
pool size, steps, final held-out loss per plane and the sha256 of every shipped file.

``python -m orthodiff.pretrained PRETRAINING_FOLDER`` copies a cached bench pretraining here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import OrthodiffError
from ..fileio import read_json, sha256_file, write_json
from ..planes import PLANES

KNEE_SMALL = "knee-small"
PROVENANCE = "provenance.json"
# what made the shipped weights: the bench pretrains into its shared cache, this module copies them
MAKE_COMMANDS = ("orthodiff bench label-fraction --preset small --out bench/label-fraction",
                 "python -m orthodiff.pretrained bench/pretrain-cache/<pretraining key>")


def shipped_folder(name: str = KNEE_SMALL) -> Path:
    """The shipped pretraining ``name`` (a folder holding ``denoisers/<plane>``), its files checked
    against the sha256 its provenance records."""
    return check_shipped(Path(__file__).parent / name)


def check_shipped(folder: Path) -> Path:
    """``folder``, once every file its provenance lists is there with the recorded sha256."""
    provenance = Path(folder) / PROVENANCE
    if not provenance.exists():
        raise OrthodiffError(f"{folder}: no shipped denoisers ({PROVENANCE} missing); reinstall orthodiff, "
                             "or pretrain your own (`orthodiff demo --pretrain`)")
    for relative, digest in read_json(provenance)["sha256"].items():
        path = Path(folder) / relative
        if not path.exists() or sha256_file(path) != digest:
            raise OrthodiffError(f"{path}: missing or changed since it was shipped; reinstall orthodiff")
    return Path(folder)


def provenance(name: str = KNEE_SMALL) -> dict:
    return read_json(shipped_folder(name) / PROVENANCE)


def ship(pretraining: Path, name: str = KNEE_SMALL) -> Path:
    """Copy the three denoisers of a cached bench pretraining into the package, with provenance."""
    from ..bench.report.pretraining_report import heldout_curves
    from ..config import load_config

    pretraining = Path(pretraining)
    missing = [p for p in PLANES if not (pretraining / "denoisers" / p / "config.json").exists()]
    if missing:
        raise OrthodiffError(f"{pretraining}: no finished denoisers for {', '.join(missing)}; give a bench "
                             "pretraining folder (<bench out>/../pretrain-cache/<key>) whose run has finished")
    config = load_config([pretraining / "config.yaml"])
    splits = read_json(config.data.splits)
    target = Path(__file__).parent / name
    if target.exists():
        shutil.rmtree(target)
    digests = {}
    for plane in PLANES:
        for source in sorted((pretraining / "denoisers" / plane).iterdir()):
            relative = f"denoisers/{plane}/{source.name}"
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / relative)
            digests[relative] = sha256_file(target / relative)
    curves = heldout_curves(pretraining)
    write_json(target / PROVENANCE, {
        "commands": list(MAKE_COMMANDS),
        "pretraining_key": pretraining.name,
        "pool_patients": len(splits["train"]),
        "heldout_patients": len(splits["val"]),
        "steps": int(config.pretrain.max_steps),
        "batch_size": int(config.pretrain.batch_size),
        "plane_size": {p: list(v) for p, v in config.data.plane_size.items()},
        "slab": config.data.slab,
        "heldout_loss": dict(curves),
        "sha256": digests,
    })
    return target


__all__ = ["KNEE_SMALL", "MAKE_COMMANDS", "check_shipped", "provenance", "ship", "shipped_folder"]
