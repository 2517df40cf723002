"""Pooling ablation of a finished label-fraction bench: the orthodiff probes (pretrained and on
untrained denoisers) retrained with other poolings of the same cached feature maps, against the
bench's own pooling, on the same seeds, label subsets, grid and step budget.

    python benchmarks/pooling_ablation.py bench/label-fraction --seeds 0 --fractions 1 0.1 --poolings mean grid

Each retrained cell is the bench cell's saved config with ``finetune.pooling`` changed and its own
run directory under ``BENCH/knee/ablation-pooling/<pooling>/``; a cell with a run.json is only
re-evaluated, so the script resumes. It writes ``BENCH/ablation_pooling.md``: test macro AUROC over
the bench's headline labels with its interval, the paired difference from the bench's pooling, and
the validation macro AUROC the grid chose by. (``benchmarks/probe_ablation.py`` changes any other
finetune setting the same way.)

The attention poolings are accepted too, but on CPU they are slow inside the grid: self-attention
over the 1024 positions of an ``up1`` map, for every (block, timestep, learning rate) cell at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    from orthodiff.bench.cells.ablation import bench_probe_rows, run_variants, write_variant_table
    from orthodiff.errors import OrthodiffError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a finished label-fraction bench folder (results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--poolings", nargs="+", default=["mean", "grid"])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    try:
        base, headline = bench_probe_rows(args.bench, args.seeds, args.fractions)
    except OrthodiffError as exc:
        parser.error(str(exc))
    bench_pooling = json.loads((args.bench / base[0]["run_dir"] / "run.json").read_text())["pooling"]
    variants = {p: [f"finetune.pooling={p}"] for p in args.poolings if p != bench_pooling}
    rows = run_variants(args.bench, base, "ablation-pooling", variants, bench_pooling, args.n_bootstrap)
    command = (f"python benchmarks/pooling_ablation.py {args.bench} --seeds {' '.join(map(str, args.seeds))} "
               f"--fractions {' '.join(f'{f:g}' for f in args.fractions)} --poolings {' '.join(args.poolings)}")
    description = (f"The bench's probes ({bench_pooling}) retrained on the same cached feature maps with each other "
                   "pooling: same seeds, label subsets, (block, timestep, learning rate) grid and step budget.")
    out = args.bench / "ablation_pooling.md"
    print(write_variant_table(args.bench, out, "Pooling ablation (label-fraction bench, knee)", command, description,
                              rows, bench_pooling, "pooling", headline, args.n_bootstrap))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
