"""``orthodiff bench label-fraction``: diagnosis AUROC and segmentation Dice versus the fraction
of training labels, orthodiff against scratch baselines, one knee test set for all.

Pretraining reads a separate unlabeled knee archive (patients in no labeled split, at least 5x the
labeled training patients), cached and shared with the other benches; every fraction and seed
shares it. Seed k redraws the nested label subsets (training and validation) and the heads'
initialisation; the test set never changes. Labels with fewer than 10 positive test patients are
named and left out of the headline macro.
"""

from __future__ import annotations

from pathlib import Path

from ..fileio import write_text
from .cells.ablation import ablation_lines
from .cells.cell import Cell, CellInputs
from .cells.grid import run_grid, stage
from .data.user_data import UserData, archive_size, prepare_user_joint, user_pretraining
from .data.workspace import prepare_joint
from .presets import FLOOR_METHODS, PRETRAINED_METHODS, BenchPreset
from .report import plots
from .report.learnability import learnability_lines
from .report.pretraining_report import pretraining_section
from .report.protocol import counts_from_dict, label_counts, low_label_shortfalls, protocol_lines, short_test_set
from .report.results import Pooler, ResultsFile, clearly_above, fmt, fmt_diff, fmt_pooled, select
from .report.segmentation_report import segmentation_section
from .report.training_report import convergence_lines, timing_line

BENCH = "label-fraction"
SCRATCH = ("scratch-unet", "resnet3d", "mrnet2d")
COMPARATORS = (*FLOOR_METHODS, *SCRATCH)  # what orthodiff at a low fraction must beat
JOINT = "knee"
SCENARIO = "in-domain"


def label_fraction_cells(preset: BenchPreset) -> list[Cell]:
    """Seed-major order, so an interrupted run has whole grids for its first seeds."""
    cells = []
    for seed in preset.seeds:
        for fraction in sorted(preset.fractions, reverse=True):
            cells += [Cell(JOINT, SCENARIO, "classify", m, float(fraction), int(seed)) for m in preset.methods]
        for fraction in sorted(preset.segment_fractions, reverse=True):
            cells += [Cell(JOINT, SCENARIO, "segment", m, float(fraction), int(seed)) for m in preset.segment_methods]
    return cells


def run_label_fraction(preset: BenchPreset, out: Path, header: dict, user: UserData | None = None):
    """The bench on the synthetic archives, or on the user's (``user``: labeled archive, pool, denoisers)."""
    from .data.pretraining import pool_pretraining
    from .run_result import BenchResult

    user = user or UserData()
    notes = []
    if user.labeled:
        data, notes = stage(BENCH, "data (scan, prepare, split of the labeled archive)",
                            lambda: prepare_user_joint(preset, out, user, JOINT))
    else:
        data = stage(BENCH, "data (synth, scan, prepare, split)", lambda: prepare_joint(preset, out, JOINT))
    counts = label_counts(data.splits, data.config.data.manifest, preset.min_test_positives)
    shortfalls = (short_test_set(counts, preset.min_test_patients)
                  + low_label_shortfalls(counts, minimum=preset.min_low_label_positives))
    needs_pretraining = any(m in PRETRAINED_METHODS for m in preset.methods + preset.segment_methods)
    pretrained, pool = None, {}
    if needs_pretraining and (user.labeled or user.denoisers):
        pretrained, pool, warnings = stage(BENCH, "pretraining source checked (user data)",
                                           lambda: user_pretraining(preset, out, user, data))
        shortfalls += warnings
    elif needs_pretraining:
        pretrained, pool = stage(BENCH, "pretraining on the unlabeled knee archive (shared cache)",
                                 lambda: pool_pretraining(preset, out, JOINT, data.config,
                                                          [(data.config.data.manifest, data.splits)]))
    for line in notes + shortfalls:
        print(f"[orthodiff bench {BENCH}] protocol: {line}", flush=True)
    extra = {"user_data": {**user.as_dict(), **archive_size(data.config.data.manifest), "notes": notes}} if user.given else {}
    results = ResultsFile.open(out / "results.json", {**header, "joint": JOINT, "test_set": str(data.splits),
                                                      "label_counts": counts.as_dict(), "shortfalls": shortfalls,
                                                      "unlabeled_pool": pool, **extra})

    def inputs_for(cell: Cell) -> CellInputs:
        return data.cell_inputs(cell.seed, pretrained)

    computed = run_grid(label_fraction_cells(preset), inputs_for, preset, results, BENCH)
    report, files, headline = write_label_fraction_report(results, preset, out)
    return BenchResult(name=BENCH, out=out, rows=results.rows, computed=computed, headline=headline,
                       files=[results.path, report, *files])


def headline_fractions(preset: BenchPreset) -> tuple[float, float]:
    low = 0.1 if 0.1 in preset.fractions else min(preset.fractions)
    return low, max(preset.fractions)


def write_label_fraction_report(results: ResultsFile, preset: BenchPreset, out: Path):
    rows = [r for r in results.rows if r["seed"] in preset.seeds]  # the seeds asked for
    counts = results.header.get("label_counts")
    headline_labels = counts["headline_labels"] if counts else None
    pooler = Pooler(rows, preset.n_bootstrap, root=results.path.parent, headline_labels=headline_labels)
    fractions = sorted({r["fraction"] for r in rows if r["task"] == "classify"}, reverse=True)
    methods = [m for m in preset.methods if select(rows, task="classify", method=m)]
    low, high = headline_fractions(preset)
    pool = results.header.get("unlabeled_pool") or {}
    pretraining_lines, pretraining_png = pretraining_section(pool.get("pretraining"), out)

    def cells(task, method, fraction):
        return select(rows, task=task, method=method, fraction=fraction)

    lines = [
        "# Label-fraction bench (knee)",
        "",
        f"Command: `{results.header.get('command', '')}`",
        "",
        (f"{_data_line(preset, results.header.get('user_data'))} "
        "One test set for every method, fraction and seed. Values are the mean over seeds; brackets are 95% "
        "bootstrap intervals of that mean over seeds and test patients (each replicate draws the seeds, then "
        "the test patients; the same draws for every method, so differences are paired); ± is the standard "
        "deviation over seeds (label subsets and initialisations)."),
        "",
        *_user_data_lines(results.header.get("user_data")),
        *_pool_lines(results.header.get("unlabeled_pool") or {}),
        *pretraining_lines,
        *(protocol_lines(counts_from_dict(counts), results.header.get("shortfalls", []), preset.min_test_positives)
          if counts else []),
    ]
    if methods:  # a segmentation-only run has no diagnosis table
        lines += ["## Macro AUROC over the headline labels (test patients)" if counts
                  else "## Macro AUROC (test patients)", "",
                  "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
    series = {}
    for method in methods:
        pooled = [(f, pooler.pooled(cells("classify", method, f))) for f in fractions]
        series[method] = pooled
        lines.append(f"| {method} | " + " | ".join(fmt_pooled(p) for _, p in pooled) + " |")

    headline = []
    orthodiff = [m for m in methods if m in PRETRAINED_METHODS]
    scratch = [m for m in methods if m in COMPARATORS]
    supervised = [m for m in methods if m in SCRATCH] or scratch
    if orthodiff and scratch and low in fractions:
        lines += ["", f"## Headline: orthodiff at {low:.0%} labels against the floors and the scratch baselines", "",
                  ("Differences are paired (the same bootstrap draws of seeds and test patients); an interval "
                  "above 0 means orthodiff is better beyond the seed and test-set uncertainty."), "",
                  f"| orthodiff method | baseline | baseline at {low:.0%} | difference | baseline at {high:.0%} | difference |",
                  "|---|---|---|---|---|---|"]
        for method in orthodiff:
            mine = cells("classify", method, low)
            for base in scratch:
                at_low, at_high = cells("classify", base, low), cells("classify", base, high)
                lines.append(f"| {method} {fmt_pooled(pooler.pooled(mine))} | {base} | "
                             f"{fmt_pooled(pooler.pooled(at_low))} | {fmt_diff(pooler.difference(mine, at_low))} | "
                             f"{fmt_pooled(pooler.pooled(at_high))} | {fmt_diff(pooler.difference(mine, at_high))} |")
        best_high = max(supervised, key=lambda b: pooler.pooled(cells("classify", b, high)).value or -1)
        lines += ["", ("Aims of the benchmark: orthodiff at 10% within 0.03 macro AUROC of the best supervised "
                  "baseline at 100%, and above both floors and every supervised baseline at 10% by more than "
                  "the interval."), ""]
        for method in orthodiff:
            mine = cells("classify", method, low)
            gap = pooler.difference(mine, cells("classify", best_high, high))
            beats = [b for b in scratch if clearly_above(pooler.difference(mine, cells("classify", b, low)))]
            within = gap is not None and gap["value"] >= -0.03
            verdict = (f"- {method} at {low:.0%}: {'within' if within else 'NOT within'} 0.03 of {best_high} at "
                       f"{high:.0%} (difference {fmt_diff(gap)}); above by more than the interval at {low:.0%}: "
                       f"{', '.join(beats) if beats else 'none'} of {', '.join(scratch)}.")
            lines.append(verdict)
            headline.append(verdict[2:])

    lines += _per_label_table(rows, pooler, methods, [f for f in dict.fromkeys((high, low)) if f in fractions])
    ceiling = learnability_lines(rows, headline_labels)
    lines += ["", *ceiling] if ceiling else []
    seg_lines, seg_series = segmentation_section(rows, pooler, preset.segment_methods, results.path.parent)
    lines += seg_lines

    files = []
    if series:
        files.append(plots.metric_vs_fraction(series, "macro AUROC (test)", "Knee diagnosis: macro AUROC vs labels",
                                              out / "auroc_vs_fraction.png", chance=0.5))
    if seg_series:
        files.append(plots.metric_vs_fraction(seg_series, "mean Dice (test)", "Knee segmentation: Dice vs labels",
                                              out / "dice_vs_fraction.png"))
    lines += ablation_lines(rows, results.path.parent)
    lines += convergence_lines(rows)
    if pretraining_png is not None:
        files.append(pretraining_png)
    curves = plots.loss_curves(rows, out / "loss_curves.png")
    if curves is not None:
        files.append(curves)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in files]
    lines += ["", timing_line(rows)]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md", files, headline


def _data_line(preset: BenchPreset, user: dict | None) -> str:
    if user and user.get("labeled"):
        return (f"The user's labeled archive `{user['labeled']}` ({user['studies']} studies of {user['patients']} "
                f"patients), preset `{preset.name}` for the network and training lengths, seeds {preset.seeds}.")
    return f"Preset `{preset.name}`: {preset.studies[JOINT]} synthetic knee studies, seeds {preset.seeds}."


def _user_data_lines(user: dict | None) -> list[str]:
    """What the checks of the user's data named: labels left out, studies without series, ..."""
    if not user or not user.get("notes"):
        return []
    return ["## The user's data: what the checks named", "", *[f"- {note}" for note in user["notes"]], ""]


def _pool_lines(pool: dict) -> list[str]:
    if not pool:
        return []
    source = pool.get("source", "synthetic")
    if source == "existing denoisers":
        steps = f"{pool['steps']} steps" if "steps" in pool else "steps not recorded"
        patients = (f"{pool['unlabeled_patients']} unlabeled patients" if "unlabeled_patients" in pool
                    else "pool size not recorded")
        digests = ", ".join(f"{plane} {digest[:12]}" for plane, digest in pool["sha256"].items())
        return [(f"Pretraining: none in this run; the denoisers of `{pool['pretraining']}` ({steps}, {patients}; "
                 f"sha256 {digests})."), ""]
    held_out = int(pool.get("held_out_patients", 0))
    trained = pool.get("trained_patients", pool["unlabeled_patients"])
    scored = f", {held_out} more held out to score its denoising loss" if held_out else ""
    if source == "training patients":
        return [(f"Pretraining: on the labeled archive's TRAINING patients only ({trained}{scored}), without their "
                 "labels; no validation or test patient was seen. There was no separate unlabeled pool, so this "
                 "measures what pretraining on the labeled scans themselves buys."), ""]
    where = f"the user's separate archive `{pool['archive']}`" if source == "separate archive" else "a separate archive"
    checked = ("no patient, exam or series shared with the labeled archive, checked" if source == "separate archive"
               else "no patient in any labeled split, checked")
    return [(f"Pretraining: {trained} unlabeled knee patients from {where}{scored} "
             f"({pool['ratio']}x the {pool['labeled_train_patients']} labeled training patients; {checked}), "
             "cached and shared by the benches."), ""]


def _per_label_table(rows, pooler: Pooler, methods, fractions) -> list[str]:
    """Per-label AUROC at the headline fractions: seed mean [95% seed and patient bootstrap interval]."""
    labels = list(dict.fromkeys(label for r in rows if r["task"] == "classify" for label in r["auroc"]))
    if not labels or not fractions:
        return []
    lines = ["", "## Per-label AUROC (mean over seeds [95% seed and patient bootstrap interval])", "",
             "| method | labels | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for fraction in fractions:
        for method in methods:
            chosen = select(rows, task="classify", method=method, fraction=fraction)
            if not chosen:
                continue
            values = [fmt(pooler.pooled(chosen, label).as_dict(), digits=2) for label in labels]
            lines.append(f"| {method} | {fraction:.0%} | " + " | ".join(values) + " |")
    return lines


__all__ = ["fmt", "label_fraction_cells", "run_label_fraction", "write_label_fraction_report"]
