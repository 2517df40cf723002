"""Pretraining ablation of a finished label-fraction bench: the orthodiff probe on denoisers pretrained
for fewer steps, or on a smaller unlabeled pool, against the bench's own pretraining and the probe
on untrained denoisers, on the same seeds, label subsets, grid and step budget.

    python benchmarks/pretraining_ablation.py bench/label-fraction --steps 150 --pool-patients 450

Each variant is one more pretraining in the bench's shared cache (``<bench>/../pretrain-cache``,
keyed by its config and patients, so a rerun finds it): ``--steps N`` pretrains for N steps on the
bench's pool, ``--pool-patients P`` for the bench's steps on P of its pool patients (drawn with the
pool's seed). Each variant's probe cells get their own feature store and run folder
(``<bench>/knee/features-ablation-<variant>``, ``runs-ablation-<variant>``); a cell with a run.json
is only re-evaluated, so the script resumes. It writes ``<bench>/ablation_pretraining.md``: test
macro AUROC over the headline labels with its interval, the paired differences from the bench's
probe and from the untrained probe, the validation macro AUROC the grid chose by, and each
pretraining's final held-out denoising loss.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

PROBE, UNTRAINED = "orthodiff-probe", "orthodiff-probe-random-init"


def variant_pretraining(preset, bench: Path, data, variant: tuple[str, int]) -> tuple[Path, int]:
    """The cached denoisers of a variant ("steps", N) or ("pool", P); returns (folder, pool patients)."""
    from orthodiff.bench.data.pretraining import POOL_SEED, cached_pretraining, pool_patients, prepare_pool
    from orthodiff.errors import OrthodiffError

    kind, value = variant
    pool = prepare_pool(preset, bench, "knee", data.config)
    patients = pool_patients(pool)
    if kind == "steps":
        pretrain = replace(pool.config.pretrain, max_steps=int(value))
        pool = replace(pool, config=replace(pool.config, pretrain=pretrain))
    else:
        if not 0 < int(value) <= len(patients):
            raise OrthodiffError(f"--pool-patients {value}: the bench's pool holds {len(patients)} patients")
        patients = sorted(random.Random(POOL_SEED).sample(patients, int(value)))
    folder = cached_pretraining(pool, preset, bench, patients, name=f"{kind}={value}")
    return folder, len(patients)


def variant_row(preset, bench: Path, data, folder: Path, name: str, fraction: float, seed: int) -> dict:
    """Train (unless done) and evaluate the probe cell on the variant's denoisers; its results row."""
    from orthodiff.bench.cells.cell import Cell, run_cell

    cell = Cell("knee", "in-domain", "classify", PROBE, float(fraction), int(seed))
    row = run_cell(cell, data.cell_inputs(int(seed), folder, tag=f"ablation-{name}"), preset)
    row["run_dir"] = str(Path(row["run_dir"]).resolve().relative_to(bench.resolve()))
    row["key"] = f"{row['key']}/pretraining={name}"  # the pooler caches by key: never the bench cell's
    return row


def final_heldout_loss(folder: Path) -> str:
    from orthodiff.bench.report.pretraining_report import heldout_curves

    curves = heldout_curves(folder)
    if not curves:
        return "n/a"
    return " / ".join(f"{points[-1][1]:.4f}" for points in curves.values())


def main(argv=None) -> int:
    from orthodiff.bench.data.workspace import prepare_joint
    from orthodiff.bench.presets import resolve_preset
    from orthodiff.bench.report.results import Pooler, fmt_diff, fmt_pooled, grid_validation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a finished label-fraction bench folder (results.json)")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="pretraining lengths to try")
    parser.add_argument("--pool-patients", type=int, nargs="*", default=[], help="unlabeled pool sizes to try")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    if not args.steps and not args.pool_patients:
        parser.error("give --steps and/or --pool-patients")

    import torch

    torch.set_num_threads(1)
    bench = args.bench.resolve()
    stored = json.loads((bench / "results.json").read_text())
    preset, _ = resolve_preset(stored["preset"], stored.get("overrides") or [])
    headline = (stored.get("label_counts") or {}).get("headline_labels")
    pool = stored.get("unlabeled_pool") or {}
    base = [r for r in stored["rows"] if r["task"] == "classify" and r["method"] in (PROBE, UNTRAINED)
            and r["seed"] in args.seeds and r["fraction"] in args.fractions]
    if not [r for r in base if r["method"] == PROBE]:
        raise SystemExit(f"{bench / 'results.json'}: no {PROBE} rows for seeds {args.seeds} at fractions "
                         f"{args.fractions}; run the label-fraction bench first")
    data = prepare_joint(preset, bench, "knee")
    steps = int(data.config.pretrain.max_steps)
    reference_name = f"bench: {steps} steps, {pool.get('unlabeled_patients', '?')} patients"
    variants = [("steps", n) for n in args.steps] + [("pool", p) for p in args.pool_patients]
    rows = {(reference_name, r["method"], r["fraction"], r["seed"]): r for r in base}
    losses = {reference_name: final_heldout_loss(Path(pool["pretraining"])) if pool.get("pretraining") else "n/a"}
    for variant in variants:
        name = f"{variant[0]}={variant[1]}"
        print(f"[pretraining ablation] pretraining {name}", flush=True)
        folder, patients = variant_pretraining(preset, bench, data, variant)
        label = f"{variant[1] if variant[0] == 'steps' else steps} steps, {patients} patients"
        losses[label] = final_heldout_loss(folder)
        for seed in args.seeds:
            for fraction in sorted(args.fractions, reverse=True):
                print(f"[pretraining ablation] {name} {fraction:g} seed{seed}", flush=True)
                rows[(label, PROBE, fraction, seed)] = variant_row(preset, bench, data, folder, name, fraction, seed)

    pooler = Pooler(list(rows.values()), args.n_bootstrap, root=bench, headline_labels=headline)
    labels = list(losses)
    lines = ["# Pretraining ablation (label-fraction bench, knee)", "",
             f"Command: `python benchmarks/pretraining_ablation.py {args.bench}"
             + (f" --steps {' '.join(map(str, args.steps))}" if args.steps else "")
             + (f" --pool-patients {' '.join(map(str, args.pool_patients))}" if args.pool_patients else "")
             + f" --seeds {' '.join(map(str, args.seeds))} --fractions {' '.join(f'{f:g}' for f in args.fractions)}`",
             "",
             ("The bench's orthodiff probe on denoisers pretrained otherwise: same seeds, label subsets, (block, "
              "timestep, learning rate) grid and step budget. Test macro AUROC over the headline labels "
              f"({', '.join(headline) if headline else 'all labels'}) with its 95% interval over test patients"
              f"{' and seeds' if len(args.seeds) > 1 else ''}; differences are paired (same bootstrap draws); "
              "validation is the grid's chosen validation macro AUROC (mean over seeds); held-out loss is each "
              "pretraining's last denoising loss on pool patients it never saw (sagittal / coronal / axial). "
              "The pool counts include those held-out patients."),
             "", "| pretraining | fraction | test macro AUROC | minus the bench's | minus untrained | validation "
             "| held-out loss |", "|---|---|---|---|---|---|---|"]
    for fraction in sorted(args.fractions, reverse=True):
        reference = [rows[k] for k in rows if k[0] == reference_name and k[1] == PROBE and k[2] == fraction]
        untrained = [rows[k] for k in rows if k[1] == UNTRAINED and k[2] == fraction]
        for label in labels:
            mine = [rows[k] for k in rows if k[0] == label and k[1] == PROBE and k[2] == fraction]
            if not mine:
                continue
            validation = grid_validation(bench, mine)
            versus_bench = "-" if label == reference_name else fmt_diff(pooler.difference(mine, reference))
            versus_untrained = fmt_diff(pooler.difference(mine, untrained)) if untrained else "n/a"
            lines.append(f"| {label} | {fraction:.0%} | {fmt_pooled(pooler.pooled(mine))} | {versus_bench} | "
                         f"{versus_untrained} | {validation} | {losses[label]} |")
    out = bench / "ablation_pretraining.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
