"""``orthodiff bench robustness``: train on some sites or field strengths, test on the others.

Each scenario holds one domain out (a site, or a field strength): its patients are removed from
training and validation and added to the test set, beside the ordinary test patients of the seen
domains. Pretraining, too, sees only the seen domains: the separate unlabeled knee archive less
its patients of the held-out domain (cached like every bench pretraining). Metrics are reported per
site and per field strength, so the unseen domain can be read against the seen ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plots
from .cells import Cell, CellInputs
from .grid import run_grid, stage
from .learnability import learnability_lines
from .presets import PRETRAINED_METHODS, BenchPreset
from .protocol import counts_from_dict, label_counts, protocol_lines
from .results import Pooler, ResultsFile, fmt_pooled, select
from .training_report import write_grouped_report
from .workspace import prepare_joint, write_domain_splits

BENCH = "robustness"
JOINT = "knee"


def robustness_cells(preset: BenchPreset) -> list[Cell]:
    return [Cell(JOINT, scenario, "classify", method, 1.0, int(seed))
            for seed in preset.seeds for scenario in preset.robustness for method in preset.methods]


def run_robustness(preset: BenchPreset, out: Path, header: dict):
    from .run_result import BenchResult

    data = stage(BENCH, "data (synth, scan, prepare, split)", lambda: prepare_joint(preset, out, JOINT))
    from .pretraining import pool_pretraining

    splits, pretrained, pools = {}, {}, {}
    needs_pretraining = any(m in PRETRAINED_METHODS for m in preset.methods)
    for scenario, spec in preset.robustness.items():
        splits[scenario] = write_domain_splits(data, spec["column"], spec["held_out"],
                                               data.root / f"splits-{scenario}.json")
        if needs_pretraining:
            pretrained[scenario], pools[scenario] = stage(
                BENCH, f"pretraining for {scenario} (unlabeled archive, seen domains only)",
                lambda s=scenario, spec=spec: pool_pretraining(
                    preset, out, JOINT, data.config, [(data.config.data.manifest, splits[s])],
                    exclude=(spec["column"], spec["held_out"]), name=s))
    counts = {s: label_counts(path, data.config.data.manifest, preset.min_test_positives).as_dict()
              for s, path in splits.items()}
    results = ResultsFile.open(out / "results.json", {**header, "scenarios": preset.robustness,
                                                      "unlabeled_pools": pools, "label_counts": counts})

    def inputs_for(cell: Cell) -> CellInputs:
        return data.cell_inputs(cell.seed, pretrained.get(cell.scenario), splits=splits[cell.scenario],
                                tag=cell.scenario)

    computed = run_grid(robustness_cells(preset), inputs_for, preset, results, BENCH)
    report, files, headline = write_robustness_report(results, preset, out)
    return BenchResult(name=BENCH, out=out, rows=results.rows, computed=computed, headline=headline,
                       files=[results.path, report, *files])


def _held_out_name(spec: dict) -> str:
    return f"{float(spec['held_out']):g}T" if spec["column"] == "field_strength" else str(spec["held_out"])


def _stratum_mean(rows: list, stratum: str, name: str):
    """(mean over seeds, mean low, mean high) of one site's or field strength's macro AUROC."""
    points = [r[stratum].get(name) for r in rows if r[stratum].get(name, {}).get("value") is not None]
    if not points:
        return None, None, None
    lows = [p["ci_low"] for p in points if p.get("ci_low") is not None]
    highs = [p["ci_high"] for p in points if p.get("ci_high") is not None]
    return (float(np.mean([p["value"] for p in points])), float(np.mean(lows)) if lows else None,
            float(np.mean(highs)) if highs else None)


def _cell(value) -> str:
    if value[0] is None:
        return "-"
    text = f"{value[0]:.3f}"
    return text + (f" [{value[1]:.3f}, {value[2]:.3f}]" if value[1] is not None else "")


def write_robustness_report(results: ResultsFile, preset: BenchPreset, out: Path):
    rows = [r for r in results.rows if r["seed"] in preset.seeds]  # the seeds asked for
    counts = results.header.get("label_counts") or {}
    lines = ["# Robustness bench (knee): unseen sites and field strengths", "",
             f"Command: `{results.header.get('command', '')}`", "",
             (f"Preset `{preset.name}`: {preset.studies[JOINT]} synthetic knee studies; seeds {preset.seeds}; "
             "100% of the seen domains' training labels. Per-site and per-field-strength values are the mean over "
             "seeds of each run's macro AUROC, brackets the mean of the runs' 95% patient-bootstrap intervals; "
             "the overall column pools seeds with one bootstrap of the seed mean over seeds and test patients. (unseen) marks the held-out domain."),
             ""]
    files, headline = [], []
    for scenario, spec in preset.robustness.items():
        chosen = select(rows, scenario=scenario)
        if not chosen:
            continue
        # the overall column: the macro over this scenario's labels with enough test positives
        pooler = Pooler(rows, preset.n_bootstrap, root=results.path.parent,
                        headline_labels=(counts.get(scenario) or {}).get("headline_labels"))
        held = _held_out_name(spec)
        stratum = "by_site" if spec["column"] == "site" else "by_field_strength"
        other = "by_field_strength" if stratum == "by_site" else "by_site"
        names = sorted({n for r in chosen for n in r[stratum]})
        other_names = sorted({n for r in chosen for n in r[other]})
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        if counts.get(scenario):
            lines += protocol_lines(counts_from_dict(counts[scenario]), [], preset.min_test_positives, name=scenario)
        lines += [f"## {scenario}: trained without {spec['column']} = {held}", "",
                  "| method | overall | " + " | ".join(_mark_unseen(n, held) for n in names) + " | unseen - seen |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        groups = {_mark_unseen(n, held): {} for n in names}
        for method in methods:
            mine = select(chosen, method=method)
            values = {n: _stratum_mean(mine, stratum, n) for n in names}
            seen = [values[n][0] for n in names if n != held and values[n][0] is not None]
            gap = (values[held][0] - float(np.mean(seen))) if held in values and values[held][0] is not None and seen else None
            lines.append(f"| {method} | {fmt_pooled(pooler.pooled(mine))} | "
                         + " | ".join(_cell(values[n]) for n in names) + f" | {'-' if gap is None else f'{gap:+.3f}'} |")
            for n in names:
                groups[_mark_unseen(n, held)][method] = values[n]
            if gap is not None:
                headline.append(f"{scenario} {method}: unseen {held} {values[held][0]:.3f}, seen mean "
                                f"{np.mean(seen):.3f} ({gap:+.3f})")
        lines += ["", f"By {other[3:].replace('_', ' ')} in the same runs:", "",
                  "| method | " + " | ".join(other_names) + " |", "|---|" + "---|" * len(other_names)]
        for method in methods:
            mine = select(chosen, method=method)
            lines.append(f"| {method} | " + " | ".join(_cell(_stratum_mean(mine, other, n)) for n in other_names) + " |")
        lines.append("")
        lines += learnability_lines(chosen, (counts.get(scenario) or {}).get("headline_labels"), name=scenario)
        files.append(plots.grouped_bars(groups, "macro AUROC (test)", f"{scenario}: macro AUROC per {spec['column']}",
                                        out / f"{scenario}.png"))
    report, files = write_grouped_report(lines, files, {scenario: select(rows, scenario=scenario) for scenario in preset.robustness},
                                         results.header.get("unlabeled_pools") or {}, rows, out)
    return report, files, headline


def _mark_unseen(name: str, held: str) -> str:
    """A stratum's column name, marked when it is the held-out domain."""
    return f"{name} (unseen)" if name == held else name
