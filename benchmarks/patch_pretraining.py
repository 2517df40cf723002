"""Patch-based pretraining against whole-plane pretraining at equal compute, on a synthetic knee cache.

    python benchmarks/patch_pretraining.py --work /tmp/orthodiff-patch-pretraining

Builds (once, in --work) a synthetic archive and its cache as ``orthodiff synth``, ``scan``,
``prepare`` and ``split`` would (--studies knee studies, plane tensors of --size, a fifth of the
patients for validation), then pretrains the --plane denoiser three ways with the same number of
voxel-steps (voxels per crop x batch x steps):

- whole planes: --steps steps of --batch-size whole planes;
- crops, more steps: crops of half the in-plane size (1/k of the voxels), k x the steps;
- crops, larger batch: the same crops, k x the batch, the same steps.

Every run is scored by the same held-out loss: the EMA weights on whole planes of the validation
patients at fixed timesteps and noise (``pretrain.eval_every``), at each quarter of the budget. The
EMA keeps the same horizon in voxel-steps (decay ** (1/k) per step for the k x steps run), and the
warmup the same share of the budget. Writes ``results.md`` (with this command and the machine) to
--out and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

PLANES = ("sagittal", "coronal", "axial")
RESULTS = Path(__file__).resolve().parent / "results" / "patch-pretraining"


def build_cache(work: Path, studies: int, size: list[int], seed: int) -> tuple[Path, Path]:
    """The cache and splits of a synthetic knee archive (reused when already built)."""
    from orthodiff.data.prepare import prepare_cache
    from orthodiff.data.scan import scan_archive
    from orthodiff.data.splits import make_splits
    from orthodiff.synth import synthesize_archive

    cache, splits = work / "cache", work / "splits.json"
    if (cache / "cache.json").exists() and splits.exists():
        return cache, splits
    print(f"[patch pretraining] building a {studies}-study synthetic cache at {size} in {work}", flush=True)
    synthesize_archive(work / "archive", studies=studies, seed=seed, workers=1, progress=False)
    scan_archive(work / "archive", work / "manifest.parquet", workers=1)
    prepare_cache(work / "manifest.parquet", cache, plane_size={p: list(size) for p in PLANES}, workers=1)
    make_splits(work / "manifest.parquet", splits, seed=seed, val_fraction=0.2, test_fraction=0.0)
    return cache, splits


def variants(args, size: list[int]) -> list[dict]:
    """(name, crop, batch, steps, warmup, EMA decay) of each run; every one spends the same voxel-steps."""
    crop = [size[0], size[1] // 2, size[2] // 2]
    k = (size[1] * size[2]) // (crop[1] * crop[2])
    return [
        {"name": "whole planes", "crop": None, "batch": args.batch_size, "steps": args.steps,
         "warmup": args.warmup, "ema": args.ema_decay},
        {"name": f"crops, {k}x steps", "crop": crop, "batch": args.batch_size, "steps": k * args.steps,
         "warmup": k * args.warmup, "ema": args.ema_decay ** (1 / k)},
        {"name": f"crops, {k}x batch", "crop": crop, "batch": k * args.batch_size, "steps": args.steps,
         "warmup": args.warmup, "ema": args.ema_decay},
    ]


def run_config(args, cache: Path, splits: Path, size: list[int], variant: dict, output: Path):
    from orthodiff.config import load_config

    crop = variant["crop"]
    return load_config(["tiny"], [
        f"seed={args.seed}",
        f"data.cache={cache}",
        f"data.splits={splits}",
        *(f"data.plane_size.{p}=[{size[0]},{size[1]},{size[2]}]" for p in PLANES),
        f"pretrain.plane={args.plane}",
        f"pretrain.output_dir={output}",
        "pretrain.patch_size=" + (f"[{crop[0]},{crop[1]},{crop[2]}]" if crop else "null"),
        f"pretrain.batch_size={variant['batch']}",
        f"pretrain.max_steps={variant['steps']}",
        f"pretrain.warmup_steps={variant['warmup']}",
        f"pretrain.ema_decay={variant['ema']}",
        f"pretrain.learning_rate={args.learning_rate}",
        f"pretrain.eval_every={variant['steps'] // 4}",
        f"pretrain.eval_volumes={args.eval_volumes}",
        f"pretrain.checkpoint_every={variant['steps']}",
        "pretrain.log_every=10",
        "pretrain.preview_every=0",
        "pretrain.tracker=none",
        "pretrain.resume=false",
    ])


def untrained_loss(cfg) -> tuple[float, float]:
    """The held-out loss of the untrained network, and the seconds one scoring takes."""
    from orthodiff.training.heldout import HeldoutLoss
    from orthodiff.training.pretrain import initial_denoiser

    heldout = HeldoutLoss(cfg, cfg.pretrain.plane, "cpu")
    model = initial_denoiser(cfg, cfg.pretrain.plane)
    start = time.perf_counter()
    loss = heldout(model)
    return loss, time.perf_counter() - start


def run_variant(cfg) -> dict:
    from orthodiff.training.pretrain import run_pretraining
    from orthodiff.training.tracking import read_metrics

    start = time.perf_counter()
    run_pretraining(cfg)
    seconds = time.perf_counter() - start
    records = read_metrics(Path(cfg.pretrain.output_dir) / cfg.pretrain.plane / "metrics.jsonl")
    heldout = [r["heldout_loss"] for r in records if "heldout_loss" in r]
    return {"seconds": seconds, "heldout": heldout}


def report(args, argv: list[str], size: list[int], rows: list[tuple[dict, dict]], untrained: tuple[float, float]) -> str:
    import torch

    voxels = size[0] * size[1] * size[2]
    lines = [
        "# Patch-based pretraining at equal compute", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/patch_pretraining.py {' '.join(argv)}`",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, torch {torch.__version__}, 1 thread (CPU shared with "
        "other jobs, so seconds are indicative).",
        "",
        (f"Synthetic knee archive (`orthodiff synth`, {args.studies} studies, seed {args.seed}), prepared at "
         f"{size[0]}x{size[1]}x{size[2]}; the {args.plane} denoiser of the `tiny` preset (widths 8-16-16, attention "
         f"at the lowest level), learning rate {args.learning_rate:g}, cosine schedule. Every run spends the same "
         "voxel-steps (voxels per crop x batch x steps). Held-out loss: the EMA weights on the whole planes of "
         f"{args.eval_volumes} validation volumes at 8 fixed timesteps and fixed noise (`pretrain.eval_every`), "
         "at each quarter of the budget; lower is better. The EMA horizon and the warmup are the same share of "
         f"the budget in every run. Untrained network: {untrained[0]:.4f}. Wall seconds include the four held-out "
         f"scorings of each run (about {untrained[1]:.0f} s each, the same in every run)."),
        "",
        "| run | crop | batch | steps | voxel-steps | wall s | held-out loss at 25% / 50% / 75% / 100% |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, result in rows:
        crop = variant["crop"] or size
        spent = crop[0] * crop[1] * crop[2] * variant["batch"] * variant["steps"]
        curve = " / ".join(f"{loss:.4f}" for loss in result["heldout"])
        lines.append(f"| {variant['name']} | {'x'.join(map(str, crop))} | {variant['batch']} | {variant['steps']} | "
                     f"{spent / voxels:g} planes | {result['seconds']:.0f} | {curve} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the archive, cache and runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for results.md")
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=3, default=[16, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--plane", default="sagittal", choices=PLANES)
    parser.add_argument("--steps", type=int, default=120, help="steps of the whole-plane run (a multiple of 4)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="warmup steps of the whole-plane run")
    parser.add_argument("--ema-decay", type=float, default=0.98, help="EMA decay per whole-plane step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-volumes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps % 4:
        parser.error("--steps must be a multiple of 4 (the held-out loss is scored at each quarter)")
    if args.size[1] % 2 or args.size[2] % 2:
        parser.error("--size: H and W must be even (the crops are half of them)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from orthodiff.fileio import write_text

    torch.set_num_threads(1)
    work = args.work.resolve()
    cache, splits = build_cache(work, args.studies, args.size, args.seed)
    rows, untrained = [], None
    for number, variant in enumerate(variants(args, args.size)):
        cfg = run_config(args, cache, splits, args.size, variant, work / f"run-{number}")
        if untrained is None:
            untrained = untrained_loss(cfg)
        print(f"[patch pretraining] {variant['name']}: crop {variant['crop'] or 'whole'}, batch {variant['batch']}, "
              f"{variant['steps']} steps", flush=True)
        rows.append((variant, run_variant(cfg)))
    text = report(args, argv, args.size, rows, untrained)
    write_text(args.out / "results.md", text)
    print(text)
    print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
