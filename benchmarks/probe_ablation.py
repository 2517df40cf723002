"""Probe ablation of a finished label-fraction bench: the orthodiff probes (pretrained and on untrained
denoisers) retrained with other finetune settings on the same cached feature maps, seeds, label
subsets and step budget, against the bench's own probes.

    python benchmarks/probe_ablation.py bench/label-fraction --seeds 0 1 2 --fractions 1 0.1 \\
        --variant fixed-all mode=probe concat_features=6 learning_rate=1e-3

Each ``--variant NAME key=value ...`` changes those finetune settings of every chosen bench probe cell
(the example: no choice on validation at all, every (block, timestep) of the store concatenated per
plane at one learning rate; validation only picks the early-stopping point). Each retrained cell has
its own run directory under ``BENCH/knee/ablation-probe/<NAME>/``; a cell with a run.json is only
re-evaluated, so the script resumes. It writes ``BENCH/ablation_probe.md`` (``--out`` to name
another): test macro AUROC over the bench's headline labels with its interval over seeds and test
patients, the paired difference from the bench's probes, and the validation macro AUROC each probe
was chosen by.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    import shlex

    from orthodiff.bench.cells.ablation import bench_probe_rows, finetune_overrides, run_variants, write_variant_table
    from orthodiff.errors import OrthodiffError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a finished label-fraction bench folder (results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME key=value",
                        help="a variant's name, then the finetune settings it changes")
    parser.add_argument("--out", default="ablation_probe.md", help="the table's file name in BENCH")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    if any(len(v) < 2 for v in args.variant):
        parser.error("--variant needs a name and at least one key=value, e.g. --variant fixed-all mode=probe")

    import torch

    torch.set_num_threads(1)
    try:
        variants = {v[0]: finetune_overrides(v[1:]) for v in args.variant}
        base, headline = bench_probe_rows(args.bench, args.seeds, args.fractions)
    except OrthodiffError as exc:
        parser.error(str(exc))
    if "bench" in variants:
        parser.error("--variant bench: that name is the bench's own probes; choose another")
    rows = run_variants(args.bench, base, "ablation-probe", variants, "bench", args.n_bootstrap)
    command = shlex.join(["python", "benchmarks/probe_ablation.py", str(args.bench),
                          "--seeds", *map(str, args.seeds), "--fractions", *(f"{f:g}" for f in args.fractions)]
                         + [part for v in args.variant for part in ("--variant", *v)])
    description = ("The bench's probes retrained with other finetune settings on the same cached feature maps, "
                   "seeds, label subsets and step budget. Variants: "
                   + "; ".join(f"{v[0]}: {' '.join(v[1:])}" for v in args.variant)
                   + ".")
    print(write_variant_table(args.bench, args.bench / args.out, "Probe ablation (label-fraction bench, knee)",
                              command, description, rows, "bench", "variant", headline, args.n_bootstrap))
    print(f"wrote {args.bench / args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
