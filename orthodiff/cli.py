"""The ``orthodiff`` command. Heavy libraries are imported inside the commands that use them,
so ``orthodiff --help`` answers at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .config import PRESET_RULE, preset_names
from .errors import OrthodiffError
from .fileio import disk_full_errno

app = typer.Typer(
    name="orthodiff",
    help="Diffusion foundation models of musculoskeletal MRI: archive -> scan -> prepare -> split -> "
    "pretrain -> extract -> finetune -> evaluate -> predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: label fraction, cross-joint transfer, robustness.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ConfigOption = typer.Option(
    None, "--config", "-c",
    help=f"Preset ({', '.join(preset_names())}) or YAML file (repeatable; later wins): {PRESET_RULE}.",
)
OverridesArgument = typer.Argument(None, help="key=value overrides, e.g. pretrain.max_steps=200 seed=1")


def _workers(value: Optional[int], option: str = "--workers") -> int:
    """A ``--workers`` value: None means every core (0 to the library); below 1 is one line."""
    from .data.workers import resolve_workers

    return 0 if value is None else resolve_workers(value, option)


def _config(files, overrides, section=None):
    from .config import load_config

    return load_config(files or [], overrides or [], section=section)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic archive into."),
    joint: str = typer.Option("knee", help="knee, ankle or shoulder."),
    studies: int = typer.Option(200, help="Number of studies (exams)."),
    seed: int = typer.Option(0, help="Seed; the same seed writes the same archive."),
    format: str = typer.Option("nifti", "--format", help="nifti or dicom."),
    matrix: int = typer.Option(128, help="In-plane matrix of the largest site (32 to 1024)."),
    workers: Optional[int] = typer.Option(None, help="Parallel processes (default: every core)."),
    preview: bool = typer.Option(False, "--preview", help="Also write OUT/preview.png: the archive's first studies, then each label beside the same knee without it, at the archive's matrix and at 8x32x32 and a 16x64x64 joint crop."),
):
    """Write a synthetic archive: three planes per study, segmentations, labels and metadata."""
    workers = _workers(workers)
    from .synth import synthesize_archive

    summary = synthesize_archive(out, joint=joint, studies=studies, seed=seed, fmt=format, matrix=matrix, workers=workers)
    typer.echo(summary.describe())
    if preview:
        from .synth.preview import write_preview

        typer.echo(f"Preview: {write_preview(out)}")


@app.command()
def scan(
    archive: List[Path] = typer.Argument(..., help="Folder tree of DICOM, NIfTI, NRRD/MHA or MRNet files (with --merge: the shard manifests)."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet or .csv)."),
    labels: Optional[Path] = typer.Option(None, help="Labels CSV (default: labels.csv in the archive)."),
    metadata: Optional[Path] = typer.Option(None, help="Metadata CSV (default: metadata.csv in the archive)."),
    check_voxels: bool = typer.Option(
        True, "--check-voxels/--headers-only", help="Read every series once to catch NaN, constant or corrupt data."
    ),
    keep_localizers: bool = typer.Option(False, "--keep-localizers", help="Keep series judged localizers or scouts."),
    keep_series: Optional[Path] = typer.Option(
        None, help="Text file of SeriesInstanceUIDs or archive paths to keep whatever they are judged (default: keep_series.txt in the archive)."
    ),
    workers: Optional[int] = typer.Option(None, help="Parallel processes (default: every core)."),
    shard: Optional[str] = typer.Option(None, help="I/N: scan only shard I of N of the archive's top-level folders."),
    merge: bool = typer.Option(False, "--merge", help="Join shard manifests (and their errors files) given as arguments into --out."),
):
    """Find series, read their geometry, detect planes, group studies, write a manifest."""
    if merge:
        from .data.scan_merge import merge_scan_shards

        typer.echo(merge_scan_shards(archive, out).describe())
        return
    if len(archive) != 1:
        raise OrthodiffError(f"scan takes one archive folder, got {len(archive)}; to join shard manifests add --merge")
    from .data.scan import scan_archive

    result = scan_archive(
        archive[0], out, labels=labels, metadata=metadata, check_voxels=check_voxels,
        keep_localizers=keep_localizers, keep_series=keep_series, workers=_workers(workers) or None, shard=shard,
    )  # fmt: skip
    typer.echo(result.describe())


@app.command()
def prepare(
    manifest: Path = typer.Argument(..., help="Manifest written by `orthodiff scan`."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder for plane tensors."),
    config: Optional[List[str]] = ConfigOption,
    workers: Optional[int] = typer.Option(None, help="Parallel processes (default: every core)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: prepare only shard I of N (1..N) into OUT/shards/I-of-N; then --merge."
    ),
    merge: bool = typer.Option(False, "--merge", help="Join the finished shards in OUT into one cache."),
    plane: Optional[List[str]] = typer.Option(None, "--plane", help="Prepare only this plane (repeatable); "
                                              "short for data.series.planes=[...]."),
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Turn each series into a plane tensor (1, D, H, W), cached and resumable."""
    workers = _workers(workers)
    planes = [f"data.series.planes=[{','.join(plane)}]"] if plane else []
    cfg = _config(config, list(overrides or []) + planes, section="data")
    if merge:
        if shard is not None:
            raise OrthodiffError("--merge joins every shard; give it without --shard")
        from .data.shards import merge_shards

        merged = merge_shards(manifest, out, selection=cfg.data.series)
        typer.echo(
            f"Merged {merged['shards']} shards into {out}: {merged['series']} series prepared, {merged['errors']} "
            f"failed (listed in {out / 'errors.csv'}). Index: {out / 'index.parquet'}."
        )
        return
    from .data.prepare import prepare_cache
    result = prepare_cache(
        manifest, out, plane_size=cfg.data.plane_size, workers=workers, slice_spacing=cfg.data.slice_spacing,
        slab=cfg.data.slab, shard=shard, selection=cfg.data.series, field_of_view_mm=cfg.data.field_of_view_mm,
    )
    typer.echo(result.describe())


@app.command()
def split(
    manifest: Path = typer.Argument(..., help="Manifest written by `orthodiff scan`."),
    out: Path = typer.Option(..., "--out", "-o", help="Splits JSON to write (reused when present)."),
    config: Optional[List[str]] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Patient-level train/val/test split and nested label-fraction subsets, written once."""
    cfg = _config(config, overrides, section="data")
    from .data.splits import make_splits
    splits = make_splits(
        manifest,
        out,
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        fractions=cfg.data.label_fractions,
        labels=cfg.data.labels or None,
    )
    typer.echo(splits.describe())


@app.command()
def pretrain(
    config: Optional[List[str]] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Pretrain one denoiser per plane (plane=sagittal|coronal|axial|all) through Accelerate."""
    cfg = _config(config, overrides, section="pretrain")
    from .training.pretrain import run_pretraining
    outputs = run_pretraining(cfg)
    for plane, path in outputs.items():
        typer.echo(f"{plane}: {path}")


@app.command()
def extract(
    config: Optional[List[str]] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Cache denoiser features at (timestep, block) for every prepared study, with seeded noise."""
    cfg = _config(config, overrides, section="features")
    from .features.store import run_extraction
    path = run_extraction(cfg)
    typer.echo(f"features: {path}")


@app.command()
def finetune(
    task: str = typer.Argument(..., help="classify or segment."),
    config: Optional[List[str]] = ConfigOption,
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Train diagnosis or segmentation heads on pretrained (or scratch) denoiser features."""
    cfg = _config(config, list(overrides or []) + [f"finetune.task={task}"], section="finetune")
    from .finetune.run import run_finetune
    result = run_finetune(cfg)
    typer.echo(result.describe())


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finetune run directory (holds predictions)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write metrics (default: RUN_DIR/eval)."),
):
    """Metrics with bootstrap intervals, by site and field strength; tables and plots."""
    from .evaluation.report import run_evaluation

    result = run_evaluation(run_dir, out)
    typer.echo(result.describe())


@app.command()
def demo(
    out: Path = typer.Option(Path("orthodiff-demo"), "--out", "-o", help="Folder for the demo's run."),
    quick: bool = typer.Option(False, "--quick", help="The smallest sizes: about two minutes."),
    seed: int = typer.Option(0, help="Seed for the whole pipeline."),
    pretrain: bool = typer.Option(False, "--pretrain", help=(
        "Pretrain the denoisers again as the small bench does (2,500 unlabeled synthetic knees, about "
        "25 minutes on 2 cores) instead of reading the ones shipped with orthodiff.")),
):
    """The whole pipeline on built-in synthetic knee data, ending in a report."""
    from .demo import run_demo

    result = run_demo(out, quick=quick, seed=seed, pretrain=pretrain)
    typer.echo(result.describe())


@app.command("export")
def export_pipeline(
    classify_run: Path = typer.Argument(..., help="A `finetune classify` run directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Pipeline directory to write."),
    segment: Optional[Path] = typer.Option(None, "--segment", help="A `finetune segment` run directory."),
):
    """Assemble one pipeline directory (denoisers, heads, preprocessing, thresholds) for `predict`."""
    from .pipeline.pipeline import OrthoDiffusionPipeline

    pipeline = OrthoDiffusionPipeline.from_runs(classify_run, segment_run=segment)
    pipeline.save_pretrained(out)
    typer.echo(f"pipeline: {out}\n{pipeline.describe()}")


@app.command()
def predict(
    pipeline: Path = typer.Argument(..., help="A pipeline directory saved by OrthoDiffusionPipeline."),
    inputs: List[Path] = typer.Argument(..., help="DICOM exam folders, NIfTI files or a manifest."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder, one subfolder per study."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps",
                                  help="Grad-CAM heat maps per label and plane (one backward pass per label)."),
):
    """Probabilities, decisions, segmentations and heat maps for new studies."""
    from .pipeline.predict import run_prediction

    result = run_prediction(pipeline, inputs, out, explain=heatmaps)
    typer.echo(result.describe())


def _bench(name: str, preset: str, out: Path, overrides, user=None):
    from .bench import run_bench

    result = run_bench(name, preset=preset, out=out, overrides=overrides or [], user=user)
    typer.echo(result.describe())


BENCH_PRESET_HELP = (
    "test (seconds: the test suite's sizes), small (2 CPU cores, measured from an empty folder: about 30 min of "
    "data and pretraining, then about 1 h per seed, 3 seeds), or paper (GPUs: the paper's sizes, 16x256x256 plane "
    "tensors, 50,000 pretraining steps, 5 seeds, fractions down to 5%; what a published number should use). "
    "Costs per stage: benchmarks/README.md."
)


@bench_app.command("label-fraction")
def bench_label_fraction(
    preset: str = typer.Option("small", help=BENCH_PRESET_HELP),
    out: Path = typer.Option(Path("bench/label-fraction"), "--out", "-o"),
    labeled: Optional[Path] = typer.Option(
        None, "--labeled", help="Your labeled archive instead of the synthetic one: a folder `orthodiff scan` reads "
        "(DICOM, NIfTI/NRRD, MRNet train/valid) or a manifest it wrote (.parquet/.csv). Split by patient into "
        "train/val/test under OUT/user."),
    unlabeled: Optional[Path] = typer.Option(
        None, "--unlabeled", help="Your unlabeled archive (folder or manifest) to pretrain on; it must share no "
        "patient, StudyInstanceUID or SeriesInstanceUID with --labeled (checked)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Labels CSV keyed by study_id or patient_id, one 0/1 column per label (default: the "
        "labeled archive's labels.csv or MRNet label CSVs, as `orthodiff scan` reads them)."),
    pool_from_training: bool = typer.Option(
        False, "--pool-from-training", help="No separate unlabeled archive: pretrain on the labeled archive's "
        "training patients only (never validation or test), named so in the report."),
    denoisers: Optional[Path] = typer.Option(
        None, "--denoisers", help="Skip pretraining: a pretraining or pipeline folder holding "
        "denoisers/<plane>/model.safetensors and config.json (recorded with its sha256)."),
    overrides: Optional[List[str]] = OverridesArgument,
):
    """AUROC and Dice versus the fraction of training labels, against scratch baselines, on synthetic
    archives or your own (--labeled with --unlabeled, --pool-from-training or --denoisers)."""
    from .bench.data.user_data import UserData

    user = UserData(labeled=labeled, unlabeled=unlabeled, labels=labels, pool_from_training=pool_from_training,
                    denoisers=denoisers)
    _bench("label-fraction", preset, out, overrides, user)


@bench_app.command("cross-joint")
def bench_cross_joint(
    preset: str = typer.Option("small", help=BENCH_PRESET_HELP),
    out: Path = typer.Option(Path("bench/cross-joint"), "--out", "-o"),
    labeled: Optional[Path] = typer.Option(
        None, "--labeled", help="Your labeled archive of the target joint (folder or manifest), instead of the "
        "synthetic ankle and shoulder; its joint is the one its scans name (BodyPartExamined, metadata.csv)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Labels CSV of the target archive keyed by study_id or patient_id, one 0/1 column per label."),
    unlabeled: Optional[Path] = typer.Option(
        None, "--unlabeled", help="Your unlabeled archive of the source joint to pretrain on; it must share no "
        "patient, StudyInstanceUID or SeriesInstanceUID with --labeled (checked)."),
    denoisers: Optional[Path] = typer.Option(
        None, "--denoisers", help="Source-joint denoisers already pretrained: a pretraining or pipeline folder "
        "holding denoisers/<plane> (recorded with its sha256)."),
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Denoisers pretrained on one joint fine-tuned on another: knee on synthetic ankle and shoulder, or
    your source pool (--unlabeled) or denoisers (--denoisers) on your target archive (--labeled)."""
    from .bench.data.user_data import UserData

    _bench("cross-joint", preset, out, overrides,
           UserData(labeled=labeled, unlabeled=unlabeled, labels=labels, denoisers=denoisers))


@bench_app.command("robustness")
def bench_robustness(
    preset: str = typer.Option("small", help=BENCH_PRESET_HELP),
    out: Path = typer.Option(Path("bench/robustness"), "--out", "-o"),
    labeled: Optional[Path] = typer.Option(
        None, "--labeled", help="Your labeled archive (folder or manifest) instead of the synthetic one; needs --held-out."),
    held_out: Optional[str] = typer.Option(
        None, "--held-out", help="COLUMN=VALUE of your archive's manifest (site, manufacturer, field_strength, "
        "contrast, ...): its patients are tested on, never trained or pretrained on."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Labels CSV keyed by study_id or patient_id, one 0/1 column per label."),
    unlabeled: Optional[Path] = typer.Option(
        None, "--unlabeled", help="Your unlabeled archive to pretrain on, less its patients of the held-out domain; "
        "it must share no patient, StudyInstanceUID or SeriesInstanceUID with --labeled (checked)."),
    pool_from_training: bool = typer.Option(
        False, "--pool-from-training", help="Pretrain on the labeled archive's training patients only (never the "
        "held-out domain, validation or test)."),
    denoisers: Optional[Path] = typer.Option(
        None, "--denoisers", help="Denoisers already pretrained (a pretraining or pipeline folder); the report "
        "warns that they may have seen the held-out domain."),
    overrides: Optional[List[str]] = OverridesArgument,
):
    """Train on some domains, test on the held-out one: the synthetic archive's sites and field
    strengths, or any column of your archive (--labeled with --held-out COLUMN=VALUE)."""
    from .bench.data.user_data import UserData

    _bench("robustness", preset, out, overrides,
           UserData(labeled=labeled, unlabeled=unlabeled, labels=labels, pool_from_training=pool_from_training,
                    denoisers=denoisers, held_out=held_out))


INTERRUPTED = 130  # the shell's status for Ctrl-C; typer returns it for a KeyboardInterrupt in a command


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: a usage error is click's usage and one line (status 2), a user error one line (status 2),
    a full disk one line (status 1); an interruption is status 130."""
    try:
        status = app(args=argv, standalone_mode=False)
    except OrthodiffError as exc:
        typer.echo(f"orthodiff: error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        status = INTERRUPTED
    except typer.TyperException as exc:
        # typer raises its own click-like exceptions (usage errors among them), which need not derive from click's
        _show(exc)
        sys.exit(exc.exit_code)
    except OSError as exc:
        full = disk_full_errno(exc)
        if full is None:
            raise
        typer.echo(f"orthodiff: error: {os.strerror(full).lower()}{_where(exc)}; free space and run again", err=True)
        sys.exit(1)
    if status == INTERRUPTED:
        typer.echo("orthodiff: interrupted", err=True)
    if isinstance(status, int) and status:
        sys.exit(status)


def _show(exc: Exception) -> None:
    show = getattr(exc, "show", None)
    if show is not None:
        show()
    else:
        typer.echo(f"Error: {exc}", err=True)


def _where(exc: OSError) -> str:
    path = exc.filename or exc.filename2
    return f" at {path}" if path else ""
