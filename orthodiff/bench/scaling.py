"""The scaling study: what pretraining compute buys the frozen-feature probe.

Denoisers of several sizes and lengths (``POINTS``) are pretrained on the knee bench's unlabeled pool
and scored by the bench's probe at 100% of the training labels and at the low fraction (each low
subset redrawn with seeds 0..9), against the random-init and raw-voxel floors (once, not per point)
and, when given, the best supervised baselines of a finished label-fraction bench.

The study runs in stages that each resume, so it spreads over several sessions:

- ``pool``: the labeled archive and the unlabeled pool, through the bench's workspace and pool code
  (``--work`` plays the bench's ``--out``: the same overrides share their caches);
- ``pretrain POINT``: the point's denoisers, in the bench's shared pretraining cache;
- ``extract POINT``: one feature store per point (``extract floors``: the random-init store);
- ``probe POINT``: the probe cells (``probe floors``: the random-init and raw-voxel cells);
- ``report``: report.md and the plot.

Small outputs (the study's settings, the denoisers' weights when small, each pretraining's
held-out curve, one JSON row and the predictions per probe cell) go to the results folder, so a
fresh machine resumes from them; bulky data stays under ``--work``.

Every probe of a point reads the one feature store, extracted with seed ``FEATURE_SEED``; subset
seed k redraws which training and validation patients carry labels (``write_reseeded_splits``), and
the probe's initialisation stays seed ``FEATURE_SEED``, so the spread over seeds is the spread over
label subsets. At 100% every seed would train the same probe: it runs once.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import OrthodiffError
from ..fileio import read_json, write_json, write_text

log = logging.getLogger(__name__)

JOINT = "knee"
SCENARIO = "scaling"
PROBE, RANDOM_INIT, RAW = "orthodiff-probe", "orthodiff-probe-random-init", "raw-voxels"
FLOORS = "floors"  # the stage argument that names the floors instead of a point
FEATURE_SEED = 0
HELDOUT_POINTS = 12  # held-out loss scorings per pretraining
MAX_COPIED_BYTES = 10 * 2**20  # denoiser weights up to this size are kept in the results folder
SUPERVISED = ("scratch-unet", "resnet3d", "mrnet2d")
STAGES = ("pool", "pretrain", "extract", "probe", "report")


@dataclass(frozen=True)
class ScalingPoint:
    """One pretraining of the study: base width, optimizer steps and the crop (``crop_divisor`` 2:
    crops of half the plane's height and width, all its slices; 1: whole planes)."""

    name: str
    width: int
    steps: int
    crop_divisor: int = 1

    def overrides(self, plane_size: dict) -> list[str]:
        """ExperimentConfig overrides on top of the study's preset; warmup, held-out scoring and
        checkpoints scale with the steps (at 600 steps they are the ``small`` preset's own)."""
        items = [f"model.base_channels={self.width}", f"pretrain.max_steps={self.steps}",
                 f"pretrain.warmup_steps={self.steps // 20}",
                 f"pretrain.eval_every={max(1, self.steps // HELDOUT_POINTS)}",
                 f"pretrain.checkpoint_every={max(1, self.steps // 10)}"]
        if self.crop_divisor > 1:
            crops = {plane: self.crop(size) for plane, size in plane_size.items()}
            items.append("pretrain.patch_size={" + ", ".join(
                f"{plane}: [{', '.join(map(str, crop))}]" for plane, crop in crops.items()) + "}")
        return items

    def crop(self, size) -> list[int]:
        depth, height, width = (int(v) for v in size)
        return [depth, height // self.crop_divisor, width // self.crop_divisor]


# The study's points, in order of compute, all on half-size crops (measured at 16x64x64 planes, 2 shared
# cores: a width-8 step of 8 crops about 0.35 s, a width-16 step 1.1 s, a width-8 step of 8 whole planes
# 3.4 s): steps, then width, then steps again. The first three span 10x in steps alone (about 1.8
# CPU-hours of pretraining); width 16 carries the span to about 40x and 120x over several sessions.
POINTS = (
    ScalingPoint("w8-200-crops", width=8, steps=200, crop_divisor=2),
    ScalingPoint("w8-600-crops", width=8, steps=600, crop_divisor=2),
    ScalingPoint("w8-2000-crops", width=8, steps=2000, crop_divisor=2),
    ScalingPoint("w16-2000-crops", width=16, steps=2000, crop_divisor=2),
    ScalingPoint("w16-6000-crops", width=16, steps=6000, crop_divisor=2),
)


@dataclass
class Study:
    """What the study runs on: the bench preset and overrides, its points and probe protocol."""

    results: Path  # small outputs (committed)
    work: Path  # the bench workspace: labeled data, feature stores, probe runs (bulky)
    preset: str = "small"
    overrides: list = field(default_factory=list)
    points: tuple = POINTS
    low_fraction: float = 0.1
    subset_seeds: list = field(default_factory=lambda: list(range(10)))
    command: str = ""

    def point(self, name: str) -> ScalingPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise OrthodiffError(f"point {name!r} is unknown; use one of {', '.join(p.name for p in self.points)} "
                             f"(or {FLOORS} for extract and probe)")

    @property
    def floor_point(self) -> ScalingPoint:
        """The random-init floor reads the widest point's architecture (the first of that width): the
        strictest floor, since random features of a wider network hold more."""
        return max(self.points, key=lambda p: p.width)

    def settings(self) -> dict:
        return {"preset": self.preset, "overrides": list(self.overrides), "low_fraction": float(self.low_fraction),
                "subset_seeds": [int(s) for s in self.subset_seeds],
                "points": [{"name": p.name, "width": p.width, "steps": p.steps, "crop_divisor": p.crop_divisor}
                           for p in self.points]}


# ------------------------------------------------------------------------------------- configs
def resolved(study: Study, point: ScalingPoint | None = None):
    """The bench preset with the study's overrides and the point's."""
    from .presets import resolve_preset

    preset, _ = resolve_preset(study.preset, study.overrides)
    if point is None:
        return preset
    plane_size = _config_of(preset, study).data.plane_size
    preset, _ = resolve_preset(study.preset, [*study.overrides, *point.overrides(plane_size)])
    return preset


def _config_of(preset, study: Study):
    from .data.workspace import joint_config

    return joint_config(preset, Path(study.work) / JOINT, JOINT)


def point_compute(study: Study, point: ScalingPoint) -> dict:
    """Parameters per plane, voxels per step and pretraining compute (parameters x voxel-steps, summed
    over the planes) of a point, from its config."""
    from ..models.denoiser import Denoiser, num_parameters
    from ..planes import PLANES

    config = _config_of(resolved(study, point), study)
    pretrain = config.pretrain
    per_plane = {}
    for plane in PLANES:
        size = config.data.plane_size[plane]
        crop = point.crop(size)
        parameters = num_parameters(Denoiser(config.model, plane, list(size), config.diffusion))
        voxels = math.prod(crop) * int(pretrain.batch_size) * int(pretrain.gradient_accumulation_steps)
        per_plane[plane] = {"parameters": parameters, "crop": crop, "voxels_per_step": voxels,
                            "compute": parameters * voxels * int(pretrain.max_steps)}
    return {"steps": int(pretrain.max_steps), "batch_size": int(pretrain.batch_size), "planes": per_plane,
            "parameters": max(v["parameters"] for v in per_plane.values()),
            "compute": sum(v["compute"] for v in per_plane.values())}


# ------------------------------------------------------------------------------- the results folder
def point_dir(study: Study, name: str) -> Path:
    return Path(study.results) / "points" / name


def check_settings(study: Study) -> None:
    """The results folder belongs to one study: a stage with other settings is refused. Points may be
    added (the record then lists them); a recorded point changed or dropped is refused, since its
    results were made with it."""
    path = Path(study.results) / "study.json"
    if not path.exists():
        return
    stored = read_json(path)
    mine = study.settings()
    for key in ("preset", "overrides", "low_fraction", "subset_seeds"):
        if stored.get(key) != mine[key]:
            raise OrthodiffError(f"{path}: made with {key}={stored.get(key)!r}, this run gives {mine[key]!r}; "
                                 "run with the stored settings or give another --results folder")
    recorded = stored.get("points", [])
    lost = [point for point in recorded if point not in mine["points"]]
    if lost:
        raise OrthodiffError(f"{path}: point {lost[0]['name']!r} was recorded as {lost[0]!r} and this run has no such "
                             "point; keep the recorded points (new ones may be added) or give another --results folder")
    if len(mine["points"]) > len(recorded):
        write_json(path, {**stored, "points": mine["points"]})


def record_command(study: Study, stage: str, seconds: float, name: str | None = None) -> None:
    """Append the stage's command and its time to COMMAND.txt (only when the stage did work)."""
    path = Path(study.results) / "COMMAND.txt"
    before = path.read_text() if path.exists() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    write_text(path, before + f"{study.command or ' '.join(filter(None, (stage, name)))}\n    {stamp}, {seconds:.0f} s\n")


def _require(path: Path, stage: str, what: str) -> None:
    if not path.exists():
        raise OrthodiffError(f"{what} is missing ({path}); run the `{stage}` stage first")


# ------------------------------------------------------------------------------------- stages
def stage_pool(study: Study) -> bool:
    """Labeled data, unlabeled pool and the label counts of every subset seed. Returns whether it did work."""
    from .data.pretraining import check_pool, heldout_patients, pool_patients, prepare_pool
    from .data.workspace import prepare_joint
    from .report.protocol import label_counts

    out = Path(study.results) / "data.json"
    preset = resolved(study)
    here = Path(_config_of(preset, study).data.cache) / "index.parquet"
    fresh = not here.exists()
    data = prepare_joint(preset, study.work, JOINT)
    pool = prepare_pool(preset, study.work, JOINT, data.config)
    if out.exists():
        return fresh  # a fresh --work was prepared again from the recorded settings
    from ..data.splits import load_splits

    splits = load_splits(data.splits)
    if not any(abs(f - study.low_fraction) < 1e-9 for f in splits.subsets):
        raise OrthodiffError(f"{data.splits}: has no {study.low_fraction:g} subset (fractions {sorted(splits.subsets)}); "
                             "give low_fraction one of them or a preset whose fractions hold it")
    patients = pool_patients(pool)
    counts = check_pool(patients, Path(data.config.data.manifest), splits.train, str(pool.root),
                        held_out=len(heldout_patients(patients, data.config)))
    per_seed = {str(seed): label_counts(data.splits_for_seed(seed), data.config.data.manifest,
                                        preset.min_test_positives).as_dict() for seed in study.subset_seeds}
    write_json(out, {"pool": counts, "label_counts": per_seed, "min_test_patients": preset.min_test_patients,
                     "min_low_label_positives": preset.min_low_label_positives})
    write_json(Path(study.results) / "study.json", study.settings())
    return True


def _data(study: Study, preset):
    """The joint's prepared data, refused in one line when the pool stage has not run here."""
    from .data.workspace import JointData

    _require(Path(study.results) / "data.json", "pool", "the study's data record")
    root = Path(study.work) / JOINT
    config = _config_of(preset, study)
    _require(Path(config.data.cache) / "index.parquet", "pool", f"the prepared labeled data under {study.work}")
    return JointData(joint=JOINT, root=root, config=config)


def stage_pretrain(study: Study, name: str) -> bool:
    """The point's denoisers (shared cache), their held-out curve, compute and measured CPU time."""
    from .data.pretraining import pool_pretraining
    from .report.pretraining_report import heldout_curves

    point = study.point(name)
    out = point_dir(study, name)
    if (out / "pretraining.json").exists():
        return False
    preset = resolved(study, point)
    data = _data(study, preset)
    start = time.perf_counter()
    folder, pool = pool_pretraining(preset, study.work, JOINT, data.config,
                                    [(data.config.data.manifest, data.splits)], name=f"scaling {name}")
    seconds = time.perf_counter() - start
    weights = _copy_small_weights(Path(folder) / "denoisers", out / "denoisers")
    write_json(out / "pretraining.json", {
        "point": name, "folder": str(folder), "weights_kept": weights, **point_compute(study, point),
        "cpu_seconds": training_seconds(Path(folder), int(data.config.pretrain.batch_size)),
        "stage_seconds": round(seconds, 1),
        "heldout": {plane: [[s, v] for s, v in points] for plane, points in heldout_curves(Path(folder)).items()},
        "pool": {k: pool[k] for k in ("unlabeled_patients", "held_out_patients", "trained_patients") if k in pool}})
    return True


def training_seconds(folder: Path, batch_size: int) -> float | None:
    """Seconds of optimizer steps over every plane, from the pretraining's own log (steps between
    records / volumes per second); at one torch thread, CPU seconds. None when nothing was logged."""
    from ..planes import PLANES
    from ..training.tracking import read_metrics

    total, found = 0.0, False
    for plane in PLANES:
        path = Path(folder) / plane / "metrics.jsonl"
        if not path.exists():
            continue
        previous = 0
        for record in read_metrics(path):
            if record.get("volumes_per_s") and record.get("step") is not None:
                step = int(record["step"])
                total += max(0, step - previous) * int(batch_size) / float(record["volumes_per_s"])
                previous, found = step, True
    return round(total, 1) if found else None


def _copy_small_weights(source: Path, destination: Path) -> bool:
    """Copy every plane's config.json and model.safetensors when they total under MAX_COPIED_BYTES."""
    files = sorted(p for p in source.glob("*/*") if p.name in ("config.json", "model.safetensors"))
    if not files or sum(p.stat().st_size for p in files) > MAX_COPIED_BYTES:
        return False
    for path in files:
        target = destination / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target.with_name(target.name + ".partial"))
        target.with_name(target.name + ".partial").replace(target)
    return True


def denoisers_of(study: Study, name: str) -> Path:
    """The folder holding ``denoisers/<plane>`` of a point: the results copy, else the cache entry."""
    record = point_dir(study, name) / "pretraining.json"
    _require(record, f"pretrain {name}", f"the pretraining of {name}")
    if (point_dir(study, name) / "denoisers").exists():
        return point_dir(study, name)
    folder = Path(read_json(record)["folder"])
    _require(folder / "denoisers", f"pretrain {name}", f"the cached denoisers of {name}")
    return folder


def _inputs(study: Study, name: str):
    """(preset, data, cell inputs) of a point or of the floors."""
    from .cells.cell import CellInputs

    point = study.floor_point if name == FLOORS else study.point(name)
    preset = resolved(study, point)
    data = _data(study, preset)
    pretrained = None if name == FLOORS else denoisers_of(study, name)
    features = data.root / "features-scaling" / (point.name if name == FLOORS else name)
    inputs = CellInputs(config=data.config, splits=data.splits, pretrained=pretrained, features=features,
                        runs=data.root / "runs-scaling" / name)
    return preset, data, inputs


def _probe_config(study: Study, name: str, method: str, fraction: float, seed: int):
    """The cell's fine-tuning config: subset seed ``seed``, features and initialisation seed FEATURE_SEED."""
    from .cells.cell import Cell, cell_config

    preset, data, inputs = _inputs(study, name)
    inputs = replace(inputs, splits=data.splits_for_seed(seed))
    cell = Cell(JOINT, SCENARIO, "classify", method, float(fraction), int(seed))
    config = cell_config(cell, inputs, preset)
    if method != RAW:
        config = replace(config, seed=FEATURE_SEED)
    return preset, cell, config


def _extraction_method(name: str) -> str:
    return RANDOM_INIT if name == FLOORS else PROBE


def stage_extract(study: Study, name: str) -> bool:
    """One feature store of the point (or the random-init store of the floors) under --work."""
    from ..features.store import HEADER, run_extraction

    if name != FLOORS:
        denoisers_of(study, name)
    else:
        _data(study, resolved(study, study.floor_point))
    _, _, config = _probe_config(study, name, _extraction_method(name), 1.0, FEATURE_SEED)
    store = Path(config.features.output_dir)
    if (store / HEADER).exists() and (point_dir(study, name) / "extraction.json").exists():
        return False
    start = time.perf_counter()
    run_extraction(config)
    write_json(point_dir(study, name) / "extraction.json", {
        "store": str(store), "seconds": round(time.perf_counter() - start, 1),
        "init": config.finetune.init, "seed": int(config.seed),
        "architecture": (study.floor_point if name == FLOORS else study.point(name)).name})
    return True


def probe_cells(study: Study, name: str) -> list[tuple[str, float, int]]:
    """(method, fraction, seed) of a point's cells: 100% once, the low fraction with every subset seed.
    The floors' raw-voxel cells all come before their random-init cells: the cheap floor is whole first."""
    methods = [RAW, RANDOM_INIT] if name == FLOORS else [PROBE]
    return [(m, fraction, seed) for m in methods for fraction, seed in
            [(1.0, FEATURE_SEED), *((float(study.low_fraction), int(s)) for s in study.subset_seeds)]]


def row_path(study: Study, name: str, method: str, fraction: float, seed: int) -> Path:
    return point_dir(study, name) / "rows" / f"{method}-{fraction:g}-seed{seed}"


def stage_probe(study: Study, name: str) -> bool:
    """Train and evaluate every missing cell; each keeps its row, predictions and run record."""
    from ..features.store import HEADER

    if name != FLOORS:
        denoisers_of(study, name)
    _require(point_dir(study, name) / "extraction.json", f"extract {name}", f"the features of {name}")
    _, _, config = _probe_config(study, name, _extraction_method(name), 1.0, FEATURE_SEED)
    _require(Path(config.features.output_dir) / HEADER, f"extract {name}", f"the feature store of {name} under --work")
    did = False
    for method, fraction, seed in probe_cells(study, name):
        folder = row_path(study, name, method, fraction, seed)
        if (folder / "row.json").exists():
            continue
        print(f"[scaling] {name} {method} {fraction:g} seed{seed}", flush=True)
        _run_probe_cell(study, name, method, fraction, seed, folder)
        did = True
    return did


def _run_probe_cell(study: Study, name: str, method: str, fraction: float, seed: int, folder: Path) -> None:
    from ..evaluation.report import run_evaluation
    from ..finetune.run import run_finetune
    from .cells.baselines_train import train_baseline
    from .cells.cell import cell_epochs, results_row, training_record

    preset, cell, config = _probe_config(study, name, method, fraction, seed)
    run_dir = Path(config.finetune.output_dir)
    start = time.perf_counter()
    if not (run_dir / "run.json").exists():
        if method == RAW:
            epochs = cell_epochs(preset, Path(config.data.splits), fraction, preset.baseline_epochs,
                                 preset.baseline_batch_size)
            train_baseline(config, RAW, run_dir, preset.baseline_options(RAW), epochs=epochs,
                           learning_rate=preset.baseline_learning_rate, batch_size=preset.baseline_batch_size)
        else:
            run_finetune(config)
    seconds = time.perf_counter() - start
    evaluation = run_evaluation(run_dir, run_dir / "eval", n_bootstrap=int(preset.n_bootstrap))
    folder.mkdir(parents=True, exist_ok=True)
    for kept in ("predictions.csv", "run.json"):  # what the report's bootstrap and validation scores read
        shutil.copyfile(run_dir / kept, folder / kept)
    row = results_row(cell, folder.relative_to(Path(study.results)), evaluation.metrics, seconds=seconds)
    row.update(training_record(run_dir))
    row["key"] = f"{row['key']}/{name}"  # the pooler caches by key: one per point
    row["point"] = name
    write_json(folder / "row.json", row)  # last: a folder with row.json is a finished cell


def point_rows(study: Study, name: str) -> list[dict]:
    root = point_dir(study, name) / "rows"
    return [read_json(p) for p in sorted(root.glob("*/row.json"))] if root.exists() else []


def probed_cells(study: Study, name: str, method: str | None = None) -> tuple[int, int]:
    """(finished, all) probe cells of a point or the floors (of one method, when given)."""
    cells = [cell for cell in probe_cells(study, name) if method in (None, cell[0])]
    return sum((row_path(study, name, *cell) / "row.json").exists() for cell in cells), len(cells)


def fully_probed(study: Study, name: str, method: str | None = None) -> bool:
    finished, cells = probed_cells(study, name, method)
    return finished == cells


# ------------------------------------------------------------------------------------- stage runner
def run_stage(study: Study, stage: str, name: str | None = None, baselines: Path | None = None) -> bool:
    """Run one stage (refused in one line when its inputs are missing); returns whether it did work
    (False: it had finished before, and nothing was written)."""
    import torch

    if stage not in STAGES:
        raise OrthodiffError(f"stage {stage!r} is unknown; use one of {', '.join(STAGES)}")
    if stage in ("pretrain", "extract", "probe") and not name:
        raise OrthodiffError(f"stage {stage} needs a point: one of {', '.join(p.name for p in study.points)}"
                             + (f" or {FLOORS}" if stage != "pretrain" else ""))
    if stage == "pretrain" and name == FLOORS:
        raise OrthodiffError(f"the floors need no pretraining; run `extract {FLOORS}`, then `probe {FLOORS}`")
    check_settings(study)
    if stage != "pool":
        _require(Path(study.results) / "study.json", "pool", "the study's settings record")
    torch.set_num_threads(max(1, int(resolved(study).threads or 1)))
    start = time.perf_counter()
    if stage == "pool":
        did = stage_pool(study)
    elif stage == "pretrain":
        did = stage_pretrain(study, name)
    elif stage == "extract":
        did = stage_extract(study, name)
    elif stage == "probe":
        did = stage_probe(study, name)
    else:
        write_report(study, baselines)
        did = True
    if did:
        record_command(study, stage, time.perf_counter() - start, name)
    return did


# ------------------------------------------------------------------------------------- report
THROUGHPUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def write_report(study: Study, baselines: Path | None = None) -> Path:
    """report.md and scaling.png in the results folder, from the results folder alone."""
    from .report.protocol import counts_from_dict, low_label_shortfalls, short_test_set
    from .report.results import Pooler, fmt_diff, fmt_pooled

    results = Path(study.results)
    _require(results / "data.json", "pool", "the study's data record")
    data = read_json(results / "data.json")
    # a point enters the report once every probe cell has run: fewer subsets would pool another protocol
    done = [p for p in study.points if fully_probed(study, p.name)]
    if not done:
        raise OrthodiffError(f"{results}: no point has all its probe cells yet; run the `probe {study.points[0].name}` "
                             "stage first")
    preset = resolved(study)
    low = float(study.low_fraction)
    counts = {seed: counts_from_dict(c) for seed, c in data["label_counts"].items()}
    headline = counts[str(study.subset_seeds[0])].headline
    # each floor enters once all its cells have run
    complete_floors = [method for method in (RANDOM_INIT, RAW) if fully_probed(study, FLOORS, method)]
    floors = [row for row in point_rows(study, FLOORS) if row["method"] in complete_floors]
    rows = [r for p in done for r in point_rows(study, p.name)] + floors
    pooler = Pooler(rows, int(preset.n_bootstrap), root=results, headline_labels=headline)
    pretrainings = {p.name: read_json(point_dir(study, p.name) / "pretraining.json") for p in done}
    smallest = min(pretrainings[p.name]["compute"] for p in done)

    def pooled(name: str, method: str, fraction: float):
        chosen = [r for r in (floors if name == FLOORS else point_rows(study, name))
                  if r["method"] == method and abs(r["fraction"] - fraction) < 1e-9]
        return chosen, pooler.pooled(chosen)

    table = [f"| point | width | steps | crop | parameters per plane | compute (parameter-voxel-steps) | x smallest "
             f"| CPU-hours | held-out loss | probe at 100% | probe at {low:.0%} | at {low:.0%} minus random-init |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    series = []
    for point in done:
        record = pretrainings[point.name]
        full_rows, full = pooled(point.name, PROBE, 1.0)
        low_rows, mine = pooled(point.name, PROBE, low)
        floor_rows, _ = pooled(FLOORS, RANDOM_INIT, low)
        loss = final_heldout_loss(record)
        hours = record["cpu_seconds"] / 3600 if record.get("cpu_seconds") else None
        crop = next(iter(record["planes"].values()))["crop"]
        table.append(
            f"| {point.name} | {point.width} | {record['steps']} | {'x'.join(map(str, crop))} | "
            f"{record['parameters']:,} | {record['compute']:.2e} | {record['compute'] / smallest:.1f} | "
            f"{'-' if hours is None else f'{hours:.2f}'} | {'-' if loss is None else f'{loss:.4f}'} | "
            f"{fmt_pooled(full)} | {fmt_pooled(mine)} | "
            f"{fmt_diff(pooler.difference(low_rows, floor_rows)) if floor_rows else '-'} |")
        series.append({"name": point.name, "compute": record["compute"], "hours": hours, "loss": loss,
                       "full": full, "low": mine})
    floor_lines = []
    for method, what in ((RANDOM_INIT, f"the probe on untrained denoisers of {study.floor_point.name}'s architecture"),
                         (RAW, "a logistic probe on the raw plane tensors")):
        _, full = pooled(FLOORS, method, 1.0)
        _, at_low = pooled(FLOORS, method, low)
        floor_lines.append(f"| {method} | {what} | {fmt_pooled(full)} | {fmt_pooled(at_low)} |")
    bands = supervised_bands(baselines, low, int(preset.n_bootstrap)) if baselines else {}
    missing = [p.name for p in study.points if p not in done]
    lines = [
        "# Scaling study: what pretraining compute buys the probe (knee)", "",
        f"Preset `{study.preset}` with {' '.join(study.overrides) or 'no overrides'}.", "",
        ("Each point pretrains the three planes' denoisers on the knee bench's unlabeled pool "
         f"({data['pool'].get('trained_patients')} patients; {data['pool'].get('held_out_patients')} more held out "
         "to score the denoising loss), extracts features once, and trains the bench's probe at 100% of the "
         f"training labels (once) and at {low:.0%} with the subset redrawn by seeds "
         f"{', '.join(map(str, study.subset_seeds))}; features and the probe's initialisation use seed "
         f"{FEATURE_SEED}, so the spread over seeds is the spread over label subsets. Macro AUROC over the "
         f"headline labels ({', '.join(headline) or 'none'}) on the one test set; brackets are 95% bootstrap "
         "intervals over subsets and test patients, ± the standard deviation over subsets; differences are "
         "paired. Compute is parameters x voxels per step x steps, summed over the planes; CPU-hours are the "
         "optimizer steps' time at one torch thread from the pretraining's log; held-out loss is the last one, "
         "mean of the planes."), "",
        *table, "",
        "## Floors (once, not per point)", "",
        f"| floor | what | at 100% | at {low:.0%} |", "|---|---|---|---|", *floor_lines, "",
    ]
    if bands:
        lines += ["## Supervised baselines (label-fraction bench)", "", f"From `{baselines}`.", "",
                  "| method | at 100% | at " + f"{low:.0%} |", "|---|---|---|"]
        lines += [f"| {m} | " + " | ".join(fmt_pooled(b[f]) if f in b else "not run" for f in (1.0, low)) + " |"
                  for m, b in bands.items()]
        lines.append("")
    lines += ["## Trend", "", *trend_lines(series, low), "", *gpu_lines(study, series), ""]
    shortfalls = short_test_set(counts[str(study.subset_seeds[0])], int(data["min_test_patients"]))
    for seed in study.subset_seeds:
        shortfalls += [f"subset seed {seed}: {s}" for s in low_label_shortfalls(
            counts[str(seed)], low, int(data["min_low_label_positives"]))]
    lines += ["## Power checks", "",
              f"Test set: {counts[str(study.subset_seeds[0])].test_patients} patients (wanted: at least "
              f"{data['min_test_patients']}); positives per headline label in each {low:.0%} subset wanted: at least "
              f"{data['min_low_label_positives']}.", ""]
    lines += (["**Where the study falls short:**", "", *[f"- {s}" for s in shortfalls]] if shortfalls
              else ["Every check holds."])
    unfinished = [(name, None) for name in missing] + [
        (FLOORS, method) for method in (RANDOM_INIT, RAW) if method not in complete_floors]
    if unfinished:
        states = []
        for name, method in unfinished:
            finished, cells = probed_cells(study, name, method)
            what = name if method is None else f"{name}: {method}"
            states.append(f"{what} ({finished} of {cells} probe cells)" if finished else what)
        lines += ["", f"Not in this report yet: {', '.join(states)}."]
    plot = plot_scaling(series, floors_for_plot(pooled, low), bands, low, results / "scaling.png")
    lines += ["", f"![scaling]({plot.name})", ""]
    write_text(results / "report.md", "\n".join(lines))
    return results / "report.md"


def final_heldout_loss(record: dict) -> float | None:
    last = [points[-1][1] for points in (record.get("heldout") or {}).values() if points]
    return sum(last) / len(last) if last else None


def supervised_bands(path: Path, low: float, n_bootstrap: int) -> dict:
    """{method: {fraction: Pooled}} of the supervised baselines in a finished label-fraction results.json."""
    from .report.results import Pooler

    path = Path(path)
    if not path.is_file():
        raise OrthodiffError(f"--baselines {path}: not found; give a finished label-fraction bench's results.json")
    stored = read_json(path)
    headline = (stored.get("label_counts") or {}).get("headline_labels")
    rows = [r for r in stored.get("rows", []) if r.get("task") == "classify" and r.get("method") in SUPERVISED]
    if not rows:
        raise OrthodiffError(f"--baselines {path}: holds no rows of {', '.join(SUPERVISED)}; give a label-fraction "
                             "bench's results.json")
    pooler = Pooler(rows, n_bootstrap, root=path.parent, headline_labels=headline)
    bands = {}
    for method in SUPERVISED:
        for fraction in (1.0, low):
            chosen = [r for r in rows if r["method"] == method and abs(r["fraction"] - fraction) < 1e-9]
            if chosen:
                bands.setdefault(method, {})[fraction] = pooler.pooled(chosen)
    return bands


def trend_lines(series: list, low: float) -> list[str]:
    """The fitted change of macro AUROC per tenfold compute, at each fraction, with its interval."""
    import numpy as np

    from ..evaluation.bootstrap import percentile_interval

    lines = []
    if len(series) < 2:
        return ["One point so far: no trend can be fitted."]
    x = np.log10([s["compute"] for s in series])
    for key, fraction in (("low", low), ("full", 1.0)):
        values = [s[key].value for s in series]
        if any(v is None for v in values):
            continue
        slope = float(np.polyfit(x, values, 1)[0])
        interval = ""
        verdict = "the interval is not known"
        replicates = [s[key].replicates for s in series]
        if all(r is not None for r in replicates):
            fits = np.polyfit(x, np.vstack(replicates), 1)[0]
            lo, hi, used = percentile_interval(fits[np.isfinite(fits)])
            if used and lo is not None:
                interval = f" [{lo:+.3f}, {hi:+.3f}]"
                verdict = ("it rises beyond the interval" if lo > 0 else
                           "it falls beyond the interval" if hi < 0 else "no trend beyond the interval")
        lines.append(f"- At {fraction:.0%} of the labels, macro AUROC changes by {slope:+.3f}{interval} per tenfold "
                     f"pretraining compute ({len(series)} points, {10 ** x.min():.1e} to {10 ** x.max():.1e}): "
                     f"{verdict}.")
    return lines


def gpu_lines(study: Study, series: list) -> list[str]:
    """What the next point (ten times the largest compute) would cost: GPU-hours at the GPU throughput
    measured by benchmarks/pretrain_throughput.py, and the reference preset's whole pretraining."""
    next_compute = 10 * max(s["compute"] for s in series)
    reference = reference_compute()
    lines = [f"Next point: {next_compute:.1e} parameter-voxel-steps (10x the largest). The `paper` preset's whole "
             f"pretraining is {reference:.1e} ({reference / max(s['compute'] for s in series):.0f}x the largest)."]
    for name, unit in (("pretrain_throughput_cuda.md", "GPU-hours"), ("pretrain_throughput.md", "CPU-hours")):
        rate = measured_rate(THROUGHPUT / name)
        if rate is None:
            lines.append(f"No {unit.split('-')[0]} throughput is measured (`{name}`; `python "
                         f"benchmarks/pretrain_throughput.py{' --device cuda' if 'cuda' in name else ''}` makes it).")
            continue
        lines.append(f"At the throughput measured in `{name}` ({rate:.2e} parameter-voxel-steps per second), the "
                     f"next point takes {next_compute / rate / 3600:.1f} {unit} and the `paper` preset's "
                     f"pretraining {reference / rate / 3600:.1f} {unit}.")
    return lines


def reference_compute() -> float:
    """Parameters x voxels per step x steps of the `paper` preset's pretraining, summed over planes."""
    from ..models.denoiser import Denoiser, num_parameters
    from .data.workspace import joint_config
    from .presets import resolve_preset

    preset, _ = resolve_preset("paper")
    config = joint_config(preset, Path("paper"), JOINT)
    total = 0.0
    for plane, size in config.data.plane_size.items():
        parameters = num_parameters(Denoiser(config.model, plane, list(size), config.diffusion))
        total += parameters * math.prod(size) * int(config.pretrain.batch_size) * int(config.pretrain.max_steps)
    return total


def measured_rate(path: Path) -> float | None:
    """Parameter-voxel-steps per second of the fastest variant in a pretrain_throughput table."""
    import re

    from ..config import load_config
    from ..models.denoiser import Denoiser, num_parameters

    if not path.exists():
        return None
    text = path.read_text()
    widths = re.search(r"widths \[([0-9, ]+)\]", text)
    volume = re.search(r"volume 1 x (\d+) x (\d+) x (\d+)", text)
    attention = re.search(r"attention at levels \[([0-9, ]*)\]", text)
    header = next((line for line in text.splitlines() if line.startswith("| variant")), None)
    if not (widths and volume and header):
        return None
    column = [c.strip() for c in header.strip("|").split("|")].index("volumes/s")
    rates = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) > column:
            try:
                rates.append(float(cells[column]))
            except ValueError:
                continue
    if not rates:
        return None
    values = [int(v) for v in widths.group(1).split(",")]
    levels = {int(v) for v in attention.group(1).split(",") if v.strip()} if attention else set()
    size = [int(v) for v in volume.groups()]
    # the throughput script's networks: group norm and attention heads as wide as the first level (at most 32)
    config = load_config([], [f"model.base_channels={values[0]}", f"model.norm_num_groups={min(32, values[0])}",
                              f"model.num_head_channels={min(32, values[0])}",
                              f"model.channel_mult=[{','.join(str(v // values[0]) for v in values)}]",
                              "model.attention_levels=[" + ",".join(
                                  "true" if i in levels else "false" for i in range(len(values))) + "]",
                              f"data.plane_size.sagittal=[{','.join(map(str, size))}]"])
    parameters = num_parameters(Denoiser(config.model, "sagittal", size, config.diffusion))
    return max(rates) * math.prod(size) * parameters


def floors_for_plot(pooled, low: float) -> dict:
    return {f"{method} at {fraction:.0%}": pooled(FLOORS, method, fraction)[1]
            for method in (RANDOM_INIT, RAW) for fraction in (1.0, low)}


def plot_scaling(series: list, floors: dict, bands: dict, low: float, path: Path) -> Path:
    """Probe AUROC at both fractions against pretraining CPU-hours and against held-out loss, with the
    floors as dashed lines and the supervised baselines' intervals as bands."""
    from ..plotting import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "hours", "pretraining CPU-hours (one thread)"),
                           (axes[1], "loss", "held-out denoising loss")):
        for fraction, name, colour in (("full", "100%", "tab:blue"), ("low", f"{low:.0%}", "tab:orange")):
            points = [(s[key], s[fraction]) for s in series if s[key] is not None and s[fraction].value is not None]
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [p.value for _, p in points]
            errors = [[max(0.0, p.value - (p.ci_low if p.ci_low is not None else p.value)) for _, p in points],
                      [max(0.0, (p.ci_high if p.ci_high is not None else p.value) - p.value) for _, p in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=colour, label=f"probe at {name}")
        for (name, floor), style in zip(floors.items(), ("--", ":", "-.", (0, (1, 3)))):
            if floor.value is not None:
                ax.axhline(floor.value, color="grey", linestyle=style, linewidth=1, label=name)
        for (method, values), colour in zip(bands.items(), ("tab:green", "tab:purple", "tab:red")):
            for fraction, band in values.items():
                if band.ci_low is not None and band.ci_high is not None:
                    ax.axhspan(band.ci_low, band.ci_high, color=colour, alpha=0.12 if fraction == 1.0 else 0.25,
                               label=f"{method} at {fraction:.0%}")
        if key == "hours":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test macro AUROC (headline labels)")
    axes[1].invert_xaxis()  # lower loss to the right, as more compute
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("What pretraining compute buys the probe", fontsize=10)
    return save_png(fig, path)


__all__ = ["FLOORS", "POINTS", "STAGES", "ScalingPoint", "Study", "measured_rate", "point_compute", "point_rows",
           "probe_cells", "run_stage", "training_seconds", "write_report"]
