"""Probe ablations of a finished bench.

- The report's feature ablation, read from what the grid probes already trained: every plane's
  one-plane probe on each (block, timestep), pretrained and on untrained denoisers, scored by
  validation macro AUROC (the score the grid chooses by), mean over seeds at each fraction.
- Retrained variants (``benchmarks/probe_ablation.py``, ``benchmarks/pooling_ablation.py``): a bench
  probe cell's saved config with some finetune settings changed, trained on the same cached
  feature maps, seeds and label subsets, and tabled against the bench's own probes.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from ...errors import OrthodiffError
from ...fileio import read_json, write_text

PROBES = ("orthodiff-probe", "orthodiff-probe-random-init")


def grid_scores(rows: list, root: Path) -> dict:
    """{(method, fraction): {(plane, "block@t"): [validation AUROC per seed]}} from the grid records
    in the probe cells' run.json files."""
    scores: dict = {}
    for row in rows:
        if row.get("task") != "classify" or row.get("method") not in PROBES:
            continue
        path = Path(root) / row["run_dir"] / "run.json"
        grid = (read_json(path).get("grid") or {}) if path.exists() else {}
        for plane, record in (grid.get("planes") or {}).items():
            for key, value in (record.get("scores") or {}).items():
                if value is not None:
                    scores.setdefault((row["method"], row["fraction"]), {}).setdefault((plane, key), []).append(value)
    return scores


def ablation_lines(rows: list, root: Path) -> list[str]:
    """A table per fraction: rows (plane, block@t), columns pretrained and untrained, with how
    often each was chosen; empty when no grid probe ran."""
    scores = grid_scores(rows, root)
    if not scores:
        return []
    fractions = sorted({f for _, f in scores}, reverse=True)
    lines = ["", "## Ablation: block and timestep per plane (validation macro AUROC of one-plane probes)", "",
             ("Each grid probe trains one probe per plane, (block, timestep) and learning rate, and keeps the best "
              "validation AUROC; the table gives its mean over seeds. Validation sets are the fraction's own "
              "(small at 10%), so these numbers choose features, they do not rank methods."), ""]
    for fraction in fractions:
        pretrained = scores.get((PROBES[0], fraction), {})
        untrained = scores.get((PROBES[1], fraction), {})
        keys = sorted(set(pretrained) | set(untrained))
        lines += [f"At {fraction:.0%} of the labels:", "",
                  "| plane | block@timestep | pretrained | untrained | difference |", "|---|---|---|---|---|"]
        for plane, key in keys:
            a, b = pretrained.get((plane, key)), untrained.get((plane, key))
            mean_a = float(np.mean(a)) if a else None
            mean_b = float(np.mean(b)) if b else None
            diff = f"{mean_a - mean_b:+.3f}" if mean_a is not None and mean_b is not None else "-"
            lines.append(f"| {plane} | {key} | {_fmt(mean_a, a)} | {_fmt(mean_b, b)} | {diff} |")
        lines.append("")
    return lines


def finetune_overrides(items: list[str]) -> list[str]:
    """``key=value`` finetune settings as ``finetune.key=value`` overrides, checked against the finetune
    fields and their types (values are YAML: ``1e-3``, ``[1, 2, 2]``, ``probe``); one line naming a bad one."""
    from ...config import FinetuneConfig, load_config

    known = {f.name for f in fields(FinetuneConfig)}
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("finetune.")
        if not sep or key not in known:
            raise OrthodiffError(f"variant setting {item!r}: give finetune key=value, e.g. mode=probe "
                                 "(keys: see FinetuneConfig in orthodiff/config.py)")
        overrides.append(f"finetune.{key}={value}")
    load_config(overrides=overrides)  # a value of the wrong type stops here, before anything trains
    return overrides


def retrain_probe(bench: Path, row: dict, folder: str, variant: str, overrides: list[str], n_bootstrap: int) -> dict:
    """Train (unless its run.json exists) and evaluate the bench row's probe with ``overrides``
    (``finetune.key=value``) of its settings, in ``<bench>/<joint>/<folder>/<variant>/<cell>``. Returns its results row, keyed
    apart from the bench cell's (the pooler caches by key)."""
    from ...config import load_config
    from ...evaluation.report import run_evaluation
    from ...finetune.run import run_finetune
    from .cell import Cell, results_row, training_record

    source = bench / row["run_dir"]
    run_dir = bench / row["joint"] / folder / variant / source.name
    config = load_config([source / "config.yaml"], overrides=overrides)
    config = replace(config, finetune=replace(config.finetune, output_dir=str(run_dir.resolve())))
    start = time.perf_counter()
    if (run_dir / "run.json").exists():
        # a finished run is reused only if it was trained with these very settings
        if load_config([run_dir / "config.yaml"]).finetune != config.finetune:
            raise OrthodiffError(f"{run_dir}: trained with other finetune settings than variant {variant!r} "
                                 "gives now; name the variant otherwise, or delete that folder to retrain it")
    else:
        run_finetune(config)
    seconds = time.perf_counter() - start
    evaluation = run_evaluation(run_dir, run_dir / "eval", n_bootstrap=n_bootstrap)
    cell = Cell(row["joint"], row["scenario"], row["task"], row["method"], row["fraction"], row["seed"])
    out = results_row(cell, run_dir.relative_to(bench), evaluation.metrics, seconds=seconds)
    out.update(training_record(run_dir))
    out["variant"] = variant
    out["key"] = f"{out['key']}/{folder}={variant}"
    return out


def bench_probe_rows(bench: Path, seeds: list[int], fractions: list[float]) -> tuple[list, list | None]:
    """The bench's probe rows at ``seeds`` and ``fractions``, and its headline labels."""
    if not (bench / "results.json").is_file():
        raise OrthodiffError(f"{bench / 'results.json'}: not found; give the folder of a finished label-fraction bench")
    stored = read_json(bench / "results.json")
    headline = (stored.get("label_counts") or {}).get("headline_labels")
    rows = [r for r in stored["rows"] if r["task"] == "classify" and r["method"] in PROBES
            and r["seed"] in seeds and r["fraction"] in fractions]
    if not rows:
        raise OrthodiffError(f"{bench / 'results.json'}: no probe rows for seeds {seeds} at fractions {fractions}; "
                             "run the label-fraction bench first")
    return rows, headline


def run_variants(bench: Path, base: list, folder: str, variants: dict, reference: str, n_bootstrap: int) -> dict:
    """{(variant, method, fraction, seed): row}: the bench's ``base`` rows under ``reference``, then every
    variant's ({name: finetune overrides}, see ``finetune_overrides``) retrained rows."""
    rows = {(reference, r["method"], r["fraction"], r["seed"]): r for r in base}
    for name, overrides in variants.items():
        for r in base:
            print(f"[{folder}] {name} {r['method']} {r['fraction']:g} seed{r['seed']}", flush=True)
            rows[(name, r["method"], r["fraction"], r["seed"])] = retrain_probe(bench, r, folder, name, overrides,
                                                                                n_bootstrap)
    return rows


def write_variant_table(bench: Path, out: Path, title: str, command: str, description: str, rows: dict,
                        reference: str, column: str, headline: list | None, n_bootstrap: int) -> str:
    """Write the ablation's markdown to ``out`` (and return it): one row per (probe, fraction, variant) with
    test macro AUROC over ``headline`` and its interval, the paired difference from the ``reference``
    variant's rows (the bench's own probes) and the validation macro AUROC each probe was chosen by."""
    from ..report.results import Pooler, fmt_diff, fmt_pooled, grid_validation

    pooler = Pooler(list(rows.values()), n_bootstrap, root=bench, headline_labels=headline)
    several_seeds = len({key[3] for key in rows}) > 1
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             (f"{description} Test macro AUROC over the headline labels "
              f"({', '.join(headline) if headline else 'all labels'}) with its 95% interval over test patients"
              f"{' and seeds' if several_seeds else ''}; the difference is paired with the bench's probes "
              "(same bootstrap draws); validation is the validation macro AUROC each probe was chosen by "
              "(mean over seeds)."), "",
             f"| probe | fraction | {column} | test macro AUROC | minus {reference} | validation |",
             "|---|---|---|---|---|---|"]
    variants = list(dict.fromkeys([reference] + [key[0] for key in rows]))
    for method in PROBES:
        for fraction in sorted({key[2] for key in rows}, reverse=True):
            baseline = [r for k, r in rows.items() if k[0] == reference and k[1] == method and k[2] == fraction]
            for variant in variants:
                mine = [r for k, r in rows.items() if k[0] == variant and k[1] == method and k[2] == fraction]
                if not mine:
                    continue
                difference = "-" if variant == reference else fmt_diff(pooler.difference(mine, baseline))
                lines.append(f"| {method} | {fraction:.0%} | {variant} | {fmt_pooled(pooler.pooled(mine))} | "
                             f"{difference} | {grid_validation(bench, mine)} |")
    text = "\n".join(lines) + "\n"
    write_text(out, text)
    return text


def _fmt(mean, values) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} (n={len(values)})"


__all__ = ["ablation_lines", "bench_probe_rows", "finetune_overrides", "grid_scores", "retrain_probe", "run_variants",
           "write_variant_table"]
