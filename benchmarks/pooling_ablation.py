"""Pooling ablation of a finished label-fraction bench: the orthodiff probes (pretrained and on
untrained denoisers) retrained with other poolings of the same cached feature maps, against the
bench's own pooling, on the same seeds, label subsets, grid and step budget.

    python benchmarks/pooling_ablation.py bench/label-fraction --seeds 0 --fractions 1 0.1 --poolings mean grid

Each retrained cell is the bench cell's saved config with ``finetune.pooling`` changed and its own
run directory under ``BENCH/knee/ablation-pooling/<pooling>/``; a cell with a run.json is only
re-evaluated, so the script resumes. It writes ``BENCH/ablation_pooling.md``: test macro AUROC over
the bench's headline labels with the patient-bootstrap interval, the paired difference from the
bench's pooling, and the validation macro AUROC the grid chose by.

The attention poolings are accepted too, but on CPU they are slow inside the grid: self-attention
over the 1024 positions of an ``up1`` map, for every (block, timestep, learning rate) cell at once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

PROBES = ("orthodiff-probe", "orthodiff-probe-random-init")


def ablation_row(bench: Path, row: dict, pooling: str, n_bootstrap: int) -> dict:
    """Train (unless done) and evaluate the bench row's probe with ``pooling``; its results row."""
    from orthodiff.bench.cells import Cell, results_row, training_record
    from orthodiff.config import load_config
    from orthodiff.evaluation.report import run_evaluation
    from orthodiff.finetune.run import run_finetune

    source = bench / row["run_dir"]
    run_dir = bench / row["joint"] / "ablation-pooling" / pooling / source.name
    config = load_config([source / "config.yaml"])
    config = replace(config, finetune=replace(config.finetune, pooling=pooling, output_dir=str(run_dir.resolve())))
    start = time.perf_counter()
    if not (run_dir / "run.json").exists():
        run_finetune(config)
    seconds = time.perf_counter() - start
    evaluation = run_evaluation(run_dir, run_dir / "eval", n_bootstrap=n_bootstrap)
    cell = Cell(row["joint"], row["scenario"], row["task"], row["method"], row["fraction"], row["seed"])
    out = results_row(cell, run_dir.relative_to(bench), evaluation.metrics, seconds=seconds)
    out.update(training_record(run_dir))
    out["pooling"] = pooling
    out["key"] = f"{out['key']}/pooling={pooling}"  # the pooler caches by key: never the bench cell's
    return out


def main(argv=None) -> int:
    from orthodiff.bench.results import Pooler, fmt_diff, fmt_pooled, grid_validation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a finished label-fraction bench folder (results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--poolings", nargs="+", default=["mean", "grid"])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    stored = json.loads((args.bench / "results.json").read_text())
    headline = (stored.get("label_counts") or {}).get("headline_labels")
    base = [r for r in stored["rows"] if r["task"] == "classify" and r["method"] in PROBES
            and r["seed"] in args.seeds and r["fraction"] in args.fractions]
    if not base:
        raise SystemExit(f"{args.bench / 'results.json'}: no probe rows for seeds {args.seeds} at fractions "
                         f"{args.fractions}; run the label-fraction bench first")
    bench_pooling = json.loads((args.bench / base[0]["run_dir"] / "run.json").read_text())["pooling"]
    rows = {(bench_pooling, r["method"], r["fraction"], r["seed"]): r for r in base}
    for pooling in [p for p in args.poolings if p != bench_pooling]:
        for r in base:
            print(f"[pooling ablation] {pooling} {r['method']} {r['fraction']:g} seed{r['seed']}", flush=True)
            rows[(pooling, r["method"], r["fraction"], r["seed"])] = ablation_row(args.bench, r, pooling,
                                                                                  args.n_bootstrap)

    pooler = Pooler(list(rows.values()), args.n_bootstrap, root=args.bench, headline_labels=headline)
    poolings = [bench_pooling] + [p for p in args.poolings if p != bench_pooling]
    lines = ["# Pooling ablation (label-fraction bench, knee)", "",
             f"Command: `python benchmarks/pooling_ablation.py {args.bench} --seeds "
             f"{' '.join(map(str, args.seeds))} --fractions {' '.join(f'{f:g}' for f in args.fractions)} "
             f"--poolings {' '.join(args.poolings)}`", "",
             (f"The bench's probes ({bench_pooling}) retrained on the same cached feature maps with each other "
              "pooling: same seeds, label subsets, (block, timestep, learning rate) grid and step budget. Test macro "
              "AUROC over the headline labels "
              f"({', '.join(headline) if headline else 'all labels'}) with its 95% interval over test patients"
              f"{' and seeds' if len(args.seeds) > 1 else ''}; the difference is paired with the bench's pooling "
              "(same bootstrap draws); validation is the grid's chosen validation macro AUROC (mean over seeds)."),
             "", "| probe | fraction | pooling | test macro AUROC | minus " + bench_pooling + " | validation |",
             "|---|---|---|---|---|---|"]
    for method in PROBES:
        for fraction in sorted(args.fractions, reverse=True):
            reference = [rows[k] for k in rows if k[0] == bench_pooling and k[1] == method and k[2] == fraction]
            for pooling in poolings:
                mine = [rows[k] for k in rows if k[0] == pooling and k[1] == method and k[2] == fraction]
                if not mine:
                    continue
                validation = grid_validation(args.bench, mine)
                difference = "-" if pooling == bench_pooling else fmt_diff(pooler.difference(mine, reference))
                lines.append(f"| {method} | {fraction:.0%} | {pooling} | {fmt_pooled(pooler.pooled(mine))} | "
                             f"{difference} | {validation} |")
    out = args.bench / "ablation_pooling.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
