"""A bench's data for one joint: synthetic archive -> manifest -> plane cache -> splits, each stage
skipped when its artifact exists, plus the per-seed label subsets and domain-shift splits.

Layout under ``<bench out>/<joint>/``: ``archive/``, ``manifest.parquet``, ``cache/``,
``splits.json`` (seed 0's subsets) and ``splits-seed<k>.json`` (same train/val/test patients,
subsets redrawn with seed k, so seeds vary which patients carry labels, never the test set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ...config import ExperimentConfig, load_config
from ...errors import OrthodiffError
from ...fileio import read_json, write_json
from ..presets import BenchPreset

log = logging.getLogger(__name__)

ARCHIVE_SEED = 0  # the synthetic archive is the same for every bench seed


@dataclass
class JointData:
    joint: str
    root: Path
    config: ExperimentConfig  # data paths filled in; seed 0

    @property
    def splits(self) -> Path:
        return Path(self.config.data.splits)

    def cell_inputs(self, seed: int, pretrained: Path | None, splits: Path | None = None, tag: str = ""):
        """What a cell of this joint trains on: seed ``seed``'s splits (or ``splits``), the denoisers
        under ``pretrained``, and a feature store and run folder kept apart per ``tag``."""
        from ..cells.cell import CellInputs

        suffix = f"-{tag}" if tag else ""
        return CellInputs(config=self.config, splits=splits or self.splits_for_seed(seed), pretrained=pretrained,
                          features=self.root / f"features{suffix}" / f"seed{int(seed)}", runs=self.root / f"runs{suffix}")

    def splits_for_seed(self, seed: int) -> Path:
        """Splits whose training subsets were drawn with ``seed`` (the base file for seed 0)."""
        if int(seed) == 0:
            return self.splits
        path = self.root / f"splits-seed{int(seed)}.json"
        if not path.exists():
            write_reseeded_splits(self.splits, Path(self.config.data.manifest), int(seed), path)
        return path


def joint_config(preset: BenchPreset, root: Path, joint: str, extra=()) -> ExperimentConfig:
    """The preset's ExperimentConfig with this joint's data paths under ``root``."""
    return load_config(
        [],
        list(preset.config)
        + [
            f"data.joint={joint}",
            f"data.archive={root / 'archive'}",
            f"data.manifest={root / 'manifest.parquet'}",
            f"data.cache={root / 'cache'}",
            f"data.splits={root / 'splits.json'}",
            f"data.label_fractions={sorted(set(preset.fractions) | set(preset.cross_joint_fractions) | set(preset.segment_fractions) | {1.0}, reverse=True)}",
            *extra,
        ],
    )


def prepare_joint(preset: BenchPreset, out: Path, joint: str) -> JointData:
    """Synthesize, scan, prepare and split one joint's archive (each stage resumes)."""
    from ...data.scan import scan_archive
    from ...data.splits import make_splits
    from ...synth import synthesize_archive

    root = Path(out) / joint
    if joint not in preset.studies:
        raise OrthodiffError(f"bench preset {preset.name!r} has no study count for joint {joint!r} (studies)")
    config = joint_config(preset, root, joint)
    data = config.data
    archive = Path(data.archive)
    if not (archive / "archive.json").exists():
        log.info("synthesizing %d %s studies", preset.studies[joint], joint)
        synthesize_archive(archive, joint=joint, studies=int(preset.studies[joint]), seed=ARCHIVE_SEED,
                           matrix=int(preset.matrix), progress=False)
    if not Path(data.manifest).exists():
        scan_archive(archive, data.manifest)
    prepare_planes(config)
    make_splits(data.manifest, data.splits, seed=config.seed, val_fraction=data.val_fraction,
                test_fraction=data.test_fraction, fractions=data.label_fractions)
    return JointData(joint=joint, root=root, config=config)


def prepare_planes(config: ExperimentConfig) -> None:
    """Prepare ``config.data.manifest`` into ``config.data.cache`` (skipped when it exists), with the
    config's slab handling and slice spacing where prepare takes them."""
    import inspect

    from ...data.prepare import prepare_cache

    data = config.data
    if (Path(data.cache) / "cache.json").exists() and (Path(data.cache) / "index.parquet").exists():
        from ...data.cache import PlaneCache

        PlaneCache(data.cache).check_field_of_view(data.field_of_view_mm)  # a crop asked for is never skipped
        return
    accepted = inspect.signature(prepare_cache).parameters
    options = {name: getattr(data, name) for name in ("slab", "slice_spacing", "field_of_view_mm") if name in accepted}
    prepare_cache(data.manifest, data.cache, plane_size=data.plane_size, **options)


def write_reseeded_splits(base: Path, manifest: Path, seed: int, out: Path) -> Path:
    """A copy of the splits file ``base`` whose nested training subsets are redrawn with ``seed``.

    Train, val and test patients stay exactly as in ``base``.
    """
    from ...data.manifest import read_manifest
    from ...data.splits import (  # subset drawing of the splits module
        load_splits,
        nested_subsets,
        patient_labels,
    )

    splits = load_splits(base)
    stored = read_json(base)
    per_patient = patient_labels(read_manifest(manifest), splits.labels)
    fractions = sorted(splits.subsets, reverse=True)
    # an offset keeps seed k's draw apart from the base file's streams (seed + 100 + step)
    subsets = nested_subsets(list(splits.train), per_patient.loc[splits.train], fractions, 1000 * int(seed) + 7)
    stored["subsets"] = {f"{key:g}": sorted(value) for key, value in subsets.items()}
    val_subsets = nested_subsets(list(splits.val), per_patient.loc[splits.val], fractions, 1000 * int(seed) + 57)
    stored["val_subsets"] = {f"{key:g}": sorted(value) for key, value in val_subsets.items()}
    stored["subset_seed"] = int(seed)
    write_json(out, stored)
    load_splits(out)  # checks nesting and disjointness
    return out


def write_domain_splits(data: JointData, column: str, held_out, out: Path) -> Path:
    """Splits for a domain shift: train and val keep only patients outside the held-out domain;
    test is the base test patients plus every patient of the held-out domain.

    So the test set holds both seen-domain patients (in-distribution reference) and the unseen
    domain; evaluation reports each site and field strength separately.
    """
    import pandas as pd

    from ...data.manifest import read_manifest
    from ...data.splits import load_splits

    if out.exists():
        return out
    frame = read_manifest(data.config.data.manifest).drop_duplicates("study_id")
    if column == "field_strength":
        in_held = pd.to_numeric(frame[column], errors="coerce").sub(float(held_out)).abs().lt(1e-6)
    else:
        in_held = frame[column].astype(str).eq(str(held_out))
    # a patient with any study in the held-out domain is held out whole (patients never straddle splits)
    held = set(frame.loc[in_held, "patient_id"].astype(str))
    if not held:
        raise OrthodiffError(f"{data.config.data.manifest}: no patient has {column}={held_out!r}; "
                             "pick a held-out value present in the archive")
    splits = load_splits(data.splits)
    stored = read_json(data.splits)
    train = [p for p in splits.train if p not in held]
    val = [p for p in splits.val if p not in held]
    test = sorted(set(splits.test) | held)
    if not train or not val:
        raise OrthodiffError(f"holding out {column}={held_out!r} leaves no training or validation patient")
    stored.update(train=train, val=val, test=test,
                  subsets={"1": train}, val_subsets={"1": val}, domain_shift={"column": column, "held_out": held_out,
                                                      "held_out_patients": len(held)})
    write_json(out, stored)
    load_splits(out)
    return out


def pretraining_config(config: ExperimentConfig, splits: Path, output_dir: Path) -> ExperimentConfig:
    """Pretrain every plane on the unlabeled scans of ``splits``' train and val patients (never test)."""
    from dataclasses import replace

    return replace(
        config,
        data=replace(config.data, splits=str(splits)),
        pretrain=replace(config.pretrain, plane="all", output_dir=str(output_dir)),
    )


def pretrain(config: ExperimentConfig, splits: Path, output_dir: Path) -> Path:
    """Denoisers for every plane under ``output_dir/denoisers`` (resumes; skipped when all exist)."""
    from ...planes import PLANES
    from ...training.pretrain import run_pretraining

    done = all((output_dir / "denoisers" / plane / "config.json").exists() for plane in PLANES)
    if not done:
        run_pretraining(pretraining_config(config, splits, output_dir))
    return output_dir
