"""``orthodiff demo``: every stage of the pipeline on built-in synthetic knee data.

synth -> scan -> prepare -> split -> denoisers (the three plane denoisers the small bench pretrained
on its separate unlabeled archive, shipped with the package; ``--pretrain`` pretrains them again the
same way) -> extract -> diagnosis probes at 100% and 10% of the training labels, with the two floors
at 10% (the probe on untrained denoisers, a linear probe on raw voxels), and segmentation at 100% ->
evaluate -> ``report.md`` (with Dice per structure and predictions drawn beside the reference) and
``results.json``. Each stage writes its artifact into the demo folder, so a rerun resumes where the
last one stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from .config import ExperimentConfig, load_config, save_config
from .fileio import write_json, write_text


@dataclass(frozen=True)
class DemoSize:
    studies: int
    matrix: int
    config_files: tuple
    # Segmentation runs the denoisers on every step, so it dominates the demo's time on a CPU: it trains
    # a decoder on the frozen denoisers for a fixed optimizer-step budget, keeping the best validation Dice.
    segment_steps: int


FULL = DemoSize(studies=240, matrix=64, config_files=("demo",), segment_steps=300)
QUICK = DemoSize(studies=36, matrix=64, config_files=("demo", "demo-quick"), segment_steps=40)


@dataclass(frozen=True)
class DemoRun:
    name: str
    task: str
    fraction: float
    init: str
    mode: str
    settings: tuple = ()  # extra finetune settings as (field, value) pairs


def demo_runs(size: DemoSize) -> list[DemoRun]:
    """The fine-tuning runs the demo compares. At 10% of the labels the pretrained probe meets the two
    floors every representation must clear: the same probe on randomly initialised denoisers of the
    same configuration (what pretraining buys) and a linear probe on the raw, pooled plane tensors."""
    # A segmentation decoder starts from nothing on few studies: a larger step, smaller batches.
    segment = (("learning_rate", 5e-3), ("batch_size", 4), ("max_steps", size.segment_steps),
               ("eval_every", max(1, size.segment_steps // 6)))
    return [
        DemoRun("classify-probe-100", "classify", 1.0, "pretrained", "grid"),
        DemoRun("classify-probe-10", "classify", 0.1, "pretrained", "grid"),
        DemoRun("classify-scratch-10", "classify", 0.1, "scratch", "grid"),
        DemoRun("classify-raw-voxels-10", "classify", 0.1, "none", RAW_VOXELS),
        DemoRun("segment-100", "segment", 1.0, "pretrained", "probe", segment),
    ]


RAW_VOXELS = "raw-voxels"  # the linear raw-voxel floor, trained by the supervised-baseline loop


@dataclass
class DemoResult:
    out: Path
    rows: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    denoisers: Path | None = None  # the folder holding denoisers/<plane> the features came from

    def describe(self) -> str:
        lines = ["", *_results_table(self.rows)]
        total = sum(self.timings.values())
        lines += ["", f"report: {self.out / 'report.md'}   results: {self.out / 'results.json'}   ({total:.0f} s)"]
        return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seed: int = 0, pretrain: bool = False) -> DemoResult:
    size = QUICK if quick else FULL
    out = make_demo_folder(out)
    claim_demo_folder(out, quick=quick, seed=seed, pretrain=pretrain)
    config = _demo_config(out, size, seed)
    result = DemoResult(out=out)

    def stage(name, function):
        print(f"[orthodiff demo] {name} ...", flush=True)
        start = time.perf_counter()
        value = function()
        result.timings[name] = time.perf_counter() - start
        return value

    stage("synth", lambda: _synthesize(out / "archive", size, seed))
    stage("scan", lambda: _scan(out / "archive", Path(config.data.manifest)))
    stage("prepare", lambda: _prepare(config))
    stage("split", lambda: _split(config))
    denoisers = stage("denoisers", lambda: _denoisers(config, out, pretrain))
    config = replace(config, finetune=replace(config.finetune, pretrained=str(denoisers)))
    save_config(config, out / "config.yaml")
    result.denoisers = denoisers
    stage("extract", lambda: _extract(config))
    for run in demo_runs(size):
        run_config = _run_config(config, out, run)
        evaluation = stage(f"finetune {run.name}", partial(_finetune_and_evaluate, run_config, run))
        result.rows.append(_summarise(run, evaluation))
    stage("export pipeline", lambda: _export_pipeline(out))
    _write_report(result)
    return result


def make_demo_folder(out) -> Path:
    """The demo's folder, created; a file in its place is one line. Any name will do, a preset's included:
    the demo's configs are presets by name, never read from the working folder."""
    from .errors import OrthodiffError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OrthodiffError(f"--out {out}: is a file, not a folder; give a folder for the demo's run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def claim_demo_folder(out: Path, quick: bool, seed: int, pretrain: bool = False) -> None:
    """Resume only a demo of the same size, seed and denoisers: its artifacts would otherwise be reused silently."""
    from .errors import OrthodiffError
    from .fileio import read_json

    marker, settings = out / "demo.json", {"quick": bool(quick), "seed": int(seed), "pretrain": bool(pretrain)}
    if marker.exists():
        found = read_json(marker)
        if found != settings:
            raise OrthodiffError(
                f"{out}: holds a demo run with {found}, not {settings}; use another --out or delete the folder"
            )
    else:
        write_json(marker, settings)


def _demo_config(out: Path, size: DemoSize, seed: int) -> ExperimentConfig:
    return load_config(
        size.config_files,
        [
            f"seed={seed}",
            f"data.archive={out / 'archive'}",
            f"data.manifest={out / 'manifest.parquet'}",
            f"data.cache={out / 'cache'}",
            f"data.splits={out / 'splits.json'}",
            f"features.output_dir={out / 'features'}",
        ],
    )


def _synthesize(archive: Path, size: DemoSize, seed: int) -> None:
    if (archive / "archive.json").exists():
        return
    from .synth import synthesize_archive

    synthesize_archive(archive, joint="knee", studies=size.studies, seed=seed, matrix=size.matrix)


def _scan(archive: Path, manifest: Path) -> None:
    if manifest.exists():
        return
    from .data.scan import scan_archive

    scan_archive(archive, manifest)


def _prepare(config: ExperimentConfig) -> None:
    from .data.prepare import prepare_cache

    prepare_cache(config.data.manifest, config.data.cache, plane_size=config.data.plane_size)


def _split(config: ExperimentConfig) -> None:
    from .data.splits import make_splits

    make_splits(
        config.data.manifest,
        config.data.splits,
        seed=config.seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        fractions=config.data.label_fractions,
    )


def _denoisers(config: ExperimentConfig, out: Path, pretrain: bool) -> Path:
    """The folder holding ``denoisers/<plane>``: the shipped ones, or with ``pretrain`` the small
    bench's pretraining redone (hours of CPU)."""
    if not pretrain:
        from .pretrained import shipped_folder

        return shipped_folder()
    from .bench.presets import PRESETS

    return bench_pretraining(config, out, PRESETS["small"])


def bench_pretraining(config: ExperimentConfig, out: Path, preset) -> Path:
    """``preset``'s pretraining redone under ``<out>/pretraining``: its unlabeled archive, network and
    steps, checked to hold none of the demo's patients and at least 5x its training patients."""
    from .bench.data.pretraining import pool_pretraining
    from .bench.data.workspace import joint_config

    bench = replace(preset, pretrain_cache=str(out / "pretraining"))
    bench_config = joint_config(bench, out / "pretraining" / "knee", "knee")
    folder, _ = pool_pretraining(bench, out, "knee", bench_config, [(config.data.manifest, config.data.splits)])
    return folder


def _extract(config: ExperimentConfig) -> None:
    from .features.store import run_extraction

    run_extraction(config)


def _run_config(config: ExperimentConfig, out: Path, run: DemoRun) -> ExperimentConfig:
    finetune = replace(
        config.finetune,
        task=run.task,
        labels_fraction=run.fraction,
        init=run.init,
        mode=run.mode,
        output_dir=str(out / "runs" / run.name),
        **dict(run.settings),
    )
    # Features of scratch denoisers live apart: the store refuses to mix weights.
    store = "features" if run.init == "pretrained" else "features-scratch"
    features = replace(config.features, output_dir=str(out / store))
    return replace(config, finetune=finetune, features=features)


def _finetune_and_evaluate(config: ExperimentConfig, run: DemoRun):
    from .evaluation.report import run_evaluation
    from .finetune.run import run_finetune

    run_dir = Path(config.finetune.output_dir)
    if not (run_dir / "run.json").exists():
        if run.mode == RAW_VOXELS:
            from .bench.cells.baselines_train import train_baseline

            ft = config.finetune
            train_baseline(config, RAW_VOXELS, run_dir, {}, epochs=ft.epochs, learning_rate=ft.learning_rate,
                           batch_size=ft.batch_size)
        else:
            run_finetune(config)
    return run_evaluation(run_dir, run_dir / "eval")


def _export_pipeline(out: Path) -> None:
    """The 100% runs as one pipeline directory, ready for ``orthodiff predict``."""
    from .pipeline.pipeline import OrthoDiffusionPipeline

    if (out / "pipeline" / "pipeline.json").exists():
        return
    runs = out / "runs"
    pipeline = OrthoDiffusionPipeline.from_runs(runs / "classify-probe-100", segment_run=runs / "segment-100")
    pipeline.save_pretrained(out / "pipeline")


def _summarise(run: DemoRun, evaluation) -> dict:
    metrics = evaluation.metrics
    row = {
        "run": run.name,
        "task": run.task,
        "fraction": run.fraction,
        "init": run.init,
        "mode": run.mode,
        "eval": str(evaluation.out),
    }
    if run.task == "classify":
        auroc = metrics["classification"]["overall"]["macro"]["auroc"]
        row.update(macro_auroc=auroc["value"], macro_auroc_ci=[auroc.get("ci_low"), auroc.get("ci_high")])
    else:
        overall = metrics["segmentation"]["overall"]
        dice = overall["mean"]["dice"]
        row.update(mean_dice=dice["value"], mean_dice_ci=[dice.get("ci_low"), dice.get("ci_high")])
        row["thin_mean_dice"] = overall["thin_mean"]["dice"].get("value")
        row["structure_dice"] = {name: entry["dice"].get("value") for name, entry in overall["structures"].items()}
    return row


def _format_auroc(row) -> str:
    return _with_interval(row.get("macro_auroc"), row.get("macro_auroc_ci"))


def _format_dice(row) -> str:
    return _with_interval(row.get("mean_dice"), row.get("mean_dice_ci"))


def _with_interval(value, interval) -> str:
    if value is None:
        return "-"
    low, high = interval or (None, None)
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _results_table(rows: list) -> list[str]:
    lines = ["| run | labels | init | macro AUROC [95% CI] | mean Dice [95% CI] |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['fraction']:.0%} | {row['init']} | {_format_auroc(row)} | {_format_dice(row)} |"
        )
    return lines


def _pretraining_effect(rows: list) -> str:
    """The pretrained probe at 10% against each floor, and whether the test set can tell them apart."""
    by_name = {row["run"]: row for row in rows}
    mine = by_name.get("classify-probe-10")
    if not mine or mine.get("macro_auroc") is None:
        return "The pretrained probe at 10% could not be scored."
    floors = {"classify-scratch-10": "the same probe on untrained denoisers",
              "classify-raw-voxels-10": "a linear probe on raw, pooled voxels"}
    parts, unresolved = [], []
    for name, what in floors.items():
        floor = by_name.get(name)
        if not floor or floor.get("macro_auroc") is None:
            parts.append(f"{what}: not scored")
            continue
        parts.append(f"{what} {floor['macro_auroc']:.3f} ({mine['macro_auroc'] - floor['macro_auroc']:+.3f})")
        if _intervals_overlap(mine.get("macro_auroc_ci"), floor.get("macro_auroc_ci")):
            unresolved.append(what)
    text = (f"With 10% of the training labels, the probe on pretrained features reaches macro AUROC "
            f"{mine['macro_auroc']:.3f}; the floors: " + "; ".join(parts) + ".")
    if unresolved:
        text += (" Its interval overlaps that of " + " and of ".join(unresolved) + ": this test set is too small "
                 "to tell them apart, so this demo shows no difference; the benchmarks measure it.")
    return text


def _intervals_overlap(a, b) -> bool:
    """True when two [low, high] intervals overlap, or when either is missing (nothing can be told apart)."""
    if not a or not b or None in (*a, *b):
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def _structure_table(rows: list) -> list[str]:
    """Dice per structure (test patients) for each segmentation run."""
    segment = [row for row in rows if row.get("structure_dice")]
    if not segment:
        return []
    names = list(segment[0]["structure_dice"])
    lines = ["| structure | " + " | ".join(row["run"] for row in segment) + " |", "|---|" + "---|" * len(segment)]
    for name in names:
        values = [row["structure_dice"].get(name) for row in segment]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    thin = [row.get("thin_mean_dice") for row in segment]
    lines.append("| thin-structure mean | " + " | ".join("-" if v is None else f"{v:.3f}" for v in thin) + " |")
    return lines


def _segmentation_pictures(out: Path, rows: list) -> list[str]:
    """A picture of each segmentation run's predictions beside the reference, one test series per plane."""
    import numpy as np
    import pandas as pd

    from .data.cache import PlaneCache
    from .evaluation.plots import segmentation_overlays
    from .fileio import read_json

    cache, lines = PlaneCache(out / "cache"), []
    for row in rows:
        if row["task"] != "segment":
            continue
        run_dir = out / "runs" / row["run"]
        index = pd.read_csv(run_dir / "segmentations" / "index.csv")
        test = index[index["split"] == "test"].sort_values("series_id").groupby("plane", sort=True).head(1)
        examples = [{"title": f"{r.plane} {r.study_id}", "image": cache.image(r.series_id)[0],
                     "target": np.load(run_dir / r.target), "pred": np.load(run_dir / r.pred)}
                    for r in test.itertuples()]
        if examples:
            png = segmentation_overlays(examples, read_json(run_dir / "run.json")["classes"],
                                        run_dir / "segmentation_overlay.png")
            lines.append(f"![{row['run']} prediction beside the reference]({png.relative_to(out)})")
    return lines


def _denoiser_lines(folder: Path | None) -> list[str]:
    """Where the denoisers come from: how many unlabeled patients, how many steps, the held-out loss."""
    from .bench.report.pretraining_report import heldout_curves
    from .fileio import read_json
    from .pretrained import PROVENANCE

    if folder is None:
        return []
    folder = Path(folder)
    if (folder / PROVENANCE).exists():
        shipped = read_json(folder / PROVENANCE)
        source = (f"Denoisers: shipped with orthodiff, pretrained by `{shipped['commands'][0]}` for {shipped['steps']} "
                  f"steps x {shipped['batch_size']} on {shipped['pool_patients']} unlabeled synthetic knee patients "
                  "(none of them in this demo)")
        curves = {plane: [tuple(point) for point in points] for plane, points in shipped["heldout_loss"].items()}
    else:
        source = f"Denoisers: pretrained in this run into `{folder}` on the small bench's unlabeled archive"
        curves = heldout_curves(folder)
    if curves:
        source += "; held-out denoising loss at the last step: " + ", ".join(
            f"{plane} {points[-1][1]:.4f} (from {points[0][1]:.4f} at step {points[0][0]})"
            for plane, points in curves.items())
    return [source + "."]


def _write_report(result: DemoResult) -> None:
    out = result.out
    write_json(out / "results.json", {"runs": result.rows, "timings_s": result.timings})
    lines = [
        "# orthodiff demo",
        "",
        "A synthetic knee archive; three plane denoisers pretrained on a separate unlabeled archive;",
        "diagnosis probes trained with 100% and 10% of the training labels, a segmentation head with 100%,",
        "all evaluated on the held-out test patients (95% intervals: patient bootstrap).",
        "",
        *_denoiser_lines(result.denoisers),
        "",
        *_results_table(result.rows),
        "",
        _pretraining_effect(result.rows),
        "",
        "## Segmentation: Dice per structure (test patients)",
        "",
        *_structure_table(result.rows),
        "",
        *_segmentation_pictures(out, result.rows),
        "",
        f"The 100% runs are exported as one pipeline: `orthodiff predict {out / 'pipeline'} EXAM_FOLDER`.",
        "",
        "## Stage timings (seconds; a resumed stage counts only the time spent in this run)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in result.timings.items()],
        "",
        "## Evaluation plots",
        "",
    ]
    for row in result.rows:
        for png in sorted(Path(row["eval"]).glob("*.png")):
            lines.append(f"![{row['run']} {png.stem}]({png.relative_to(out)})")
    write_text(out / "report.md", "\n".join(lines) + "\n")
