"""``orthodiff bench cross-joint``: knee-pretrained denoisers fine-tuned on other joints (ankle,
shoulder) for diagnosis and segmentation, against the same networks trained from scratch and the
supervised baselines, at 100% and 10% of the new joint's training labels.

The knee denoisers come from the shared pretraining cache: pretrained once on the separate
unlabeled knee archive, the same pretraining the label-fraction bench uses (whichever bench runs
first pays for it). The target joints' scans are never seen in that pretraining. With
``target_pretraining`` the orthodiff methods also run on denoisers pretrained on the target joint's
own separate unlabeled archive (scenario ``target-pretrained``), which tells whether an archive of
the new joint is worth pretraining on.

On the user's archives (``user_data.UserData``): the target is the labeled archive (its joint as its
scans name it), the source the denoisers pretrained on the user's unlabeled source-joint archive
(checked to share no patient, exam or series with the target) or given ready; the report names both
and records where the denoisers come from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import OrthodiffError
from .cells.cell import Cell, CellInputs
from .cells.grid import run_grid, stage
from .data.user_data import (
    UserData,
    archive_size,
    prepare_user_joint,
    pretraining_provenance,
    user_pretraining,
)
from .data.workspace import joint_config, prepare_joint
from .presets import FLOOR_METHODS, PRETRAINED_METHODS, BenchPreset
from .report import plots
from .report.learnability import learnability_lines
from .report.protocol import counts_from_dict, label_counts, low_label_shortfalls, protocol_lines, short_test_set
from .report.results import Pooler, ResultsFile, fmt_diff, fmt_pooled, select
from .report.training_report import write_grouped_report

BENCH = "cross-joint"
SCENARIO = "knee-pretrained"
TARGET_SCENARIO = "target-pretrained"
SCRATCH = (*FLOOR_METHODS, "scratch-unet", "resnet3d", "mrnet2d")  # what orthodiff is compared with


def cross_joint_cells(preset: BenchPreset) -> list[Cell]:
    cells = []
    for seed in preset.seeds:
        for joint in preset.cross_joint_targets:
            for fraction in sorted(preset.cross_joint_fractions, reverse=True):
                cells += [Cell(joint, SCENARIO, "classify", m, float(fraction), int(seed)) for m in preset.methods]
                cells += [Cell(joint, SCENARIO, "segment", m, float(fraction), int(seed)) for m in preset.segment_methods]
                if preset.target_pretraining:
                    cells += [Cell(joint, TARGET_SCENARIO, "classify", m, float(fraction), int(seed))
                              for m in preset.methods if m in PRETRAINED_METHODS]
                    cells += [Cell(joint, TARGET_SCENARIO, "segment", m, float(fraction), int(seed))
                              for m in preset.segment_methods if m in PRETRAINED_METHODS]
    return cells


def run_cross_joint(preset: BenchPreset, out: Path, header: dict, user: UserData | None = None):
    """The bench on the synthetic joints, or on the user's (``user``: a target-joint labeled archive,
    and a source-joint pool to pretrain on or source denoisers)."""
    from .data.pretraining import pool_pretraining
    from .run_result import BenchResult

    user = user or UserData()
    notes = []
    if user.labeled:
        data, notes = stage(BENCH, "target data (scan, prepare, split of the labeled archive)",
                            lambda: prepare_user_joint(preset, out, user))
        if preset.target_pretraining:
            notes.append("target_pretraining: not run on the user's archives (it pretrains on a synthetic target "
                         "pool); to measure pretraining on your target joint, run `orthodiff bench label-fraction` "
                         "with --unlabeled on a pool of it")
        preset = replace(preset, cross_joint_targets=[data.joint], target_pretraining=False)
        targets = {data.joint: data}
    else:
        targets = {joint: stage(BENCH, f"{joint} data", lambda j=joint: prepare_joint(preset, out, j))
                   for joint in preset.cross_joint_targets}
    labeled = [(d.config.data.manifest, d.splits) for d in targets.values()]
    counts = {joint: label_counts(d.splits, d.config.data.manifest, preset.min_test_positives)
              for joint, d in targets.items()}
    shortfalls = {joint: short_test_set(c, preset.min_test_patients)
                  + low_label_shortfalls(c, min(preset.cross_joint_fractions), preset.min_low_label_positives)
                  for joint, c in counts.items()}
    pools, extra = {}, {}
    if user.given:
        first = next(iter(targets.values()))
        pretrained, record, warnings = stage(BENCH, "source pretraining checked (user data)",
                                             lambda: user_pretraining(preset, out, user, first))
        source = record.get("joint") or "source"
        pools[source] = record
        shortfalls = {joint: lines + warnings for joint, lines in shortfalls.items()}
        extra = {"pretrained_on": source, "source_denoisers": str(Path(pretrained).resolve()),
                 "user_data": {**user.as_dict(), "source": source, "targets": list(targets),
                               **(archive_size(first.config.data.manifest) if user.labeled else {}), "notes": notes}}
    else:
        if preset.knee_pretrained:
            pretrained = _existing_denoisers(Path(preset.knee_pretrained))
        else:
            knee_config = joint_config(preset, Path(out) / "knee", "knee")
            pretrained, pools["knee"] = stage(BENCH, "knee pretraining on the unlabeled knee archive (shared cache)",
                                              lambda: pool_pretraining(preset, out, "knee", knee_config, labeled))
        extra = {"pretrained_on": "knee", "knee_denoisers": str(Path(pretrained).resolve())}
    own = {}
    for joint, data in targets.items() if preset.target_pretraining else ():
        own[joint], pools[joint] = stage(
            BENCH, f"{joint} pretraining (its own unlabeled archive)",
            lambda d=data: pool_pretraining(preset, out, d.joint, d.config, [(d.config.data.manifest, d.splits)]))
    for line in notes + [line for lines in shortfalls.values() for line in lines]:
        print(f"[orthodiff bench {BENCH}] protocol: {line}", flush=True)
    results = ResultsFile.open(out / "results.json", {**header, **extra, "unlabeled_pools": pools,
                                                      "label_counts": {j: c.as_dict() for j, c in counts.items()},
                                                      "shortfalls": shortfalls})

    def inputs_for(cell: Cell) -> CellInputs:
        data = targets[cell.joint]
        if cell.scenario == TARGET_SCENARIO:
            return data.cell_inputs(cell.seed, own[cell.joint], tag="own")
        return data.cell_inputs(cell.seed, pretrained)

    computed = run_grid(cross_joint_cells(preset), inputs_for, preset, results, BENCH)
    report, files, headline = write_cross_joint_report(results, preset, out)
    return BenchResult(name=BENCH, out=out, rows=results.rows, computed=computed, headline=headline,
                       files=[results.path, report, *files])


def _existing_denoisers(folder: Path) -> Path:
    from ..planes import PLANES

    missing = [p for p in PLANES if not (folder / "denoisers" / p / "config.json").exists()]
    if missing:
        raise OrthodiffError(f"knee_pretrained={folder}: no denoisers/{missing[0]}/config.json there; give the "
                             "pretraining folder (e.g. an entry of <bench out>/../pretrain-cache)")
    return folder


def report_method(row: dict) -> str:
    """The method's name in tables: target-pretrained runs are their own rows."""
    return f"{row['method']} ({row['joint']}-pretrained)" if row["scenario"] == TARGET_SCENARIO else row["method"]


def write_cross_joint_report(results: ResultsFile, preset: BenchPreset, out: Path):
    # the seeds asked for; each row under the name its table shows
    rows = [{**r, "method": report_method(r)} for r in results.rows if r["seed"] in preset.seeds]
    own_pretraining = any(r["scenario"] == TARGET_SCENARIO for r in rows)
    counts = results.header.get("label_counts") or {}
    # per joint: the macro over that joint's labels with enough test positives
    poolers = {joint: Pooler(rows, preset.n_bootstrap, root=results.path.parent,
                             headline_labels=(counts.get(joint) or {}).get("headline_labels"))
               for joint in preset.cross_joint_targets}
    source = results.header.get("pretrained_on", "knee")
    lines = [f"# Cross-joint bench ({source}-pretrained denoisers on {', '.join(preset.cross_joint_targets)})", "",
             f"Command: `{results.header.get('command', '')}`", "",
             _data_line(preset, results.header)
             + f"; seeds {preset.seeds}. Mean over seeds [95% seed and patient bootstrap interval of the mean] "
             "± seed SD." + (" Methods marked (<joint>-pretrained) use denoisers pretrained on that joint's own "
                             "separate unlabeled archive instead of the knee's." if own_pretraining else ""), "",
             *_user_data_lines(results.header)]
    files, headline = [], []
    for joint in preset.cross_joint_targets:
        pooler = poolers[joint]
        if counts.get(joint):
            lines += protocol_lines(counts_from_dict(counts[joint]), (results.header.get("shortfalls") or {}).get(joint, []),
                                    preset.min_test_positives, name=joint)
        for task, metric in (("classify", "macro AUROC"), ("segment", "mean Dice")):
            chosen = select(rows, joint=joint, task=task)
            if not chosen:
                continue
            fractions = sorted({r["fraction"] for r in chosen}, reverse=True)
            methods = list(dict.fromkeys(r["method"] for r in chosen))
            lines += [f"## {joint}: {metric} ({task})", "",
                      "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
            groups = {f"{f:.0%}": {} for f in fractions}
            for method in methods:
                pooled = [pooler.pooled(select(chosen, method=method, fraction=f)) for f in fractions]
                lines.append(f"| {method} | " + " | ".join(fmt_pooled(p) for p in pooled) + " |")
                for f, p in zip(fractions, pooled):
                    groups[f"{f:.0%}"][method] = (p.value, p.ci_low, p.ci_high)
            mine = [m for m in methods if m not in SCRATCH]
            others = [m for m in methods if m in SCRATCH]
            if mine and others:
                lines += ["", "Paired differences (orthodiff minus baseline):", ""]
                for method in mine:
                    for fraction in fractions:
                        diffs = ", ".join(
                            f"{base} {fmt_diff(pooler.difference(select(chosen, method=method, fraction=fraction), select(chosen, method=base, fraction=fraction)))}"
                            for base in others)
                        text = f"{joint} {task} {method} at {fraction:.0%}: {diffs}"
                        lines.append(f"- {text}")
                        headline.append(text)
            lines.append("")
            files.append(plots.grouped_bars(groups, metric, f"{joint}: {metric} by label fraction",
                                            out / f"{joint}_{task}.png"))
        lines += learnability_lines(select(rows, joint=joint), (counts.get(joint) or {}).get("headline_labels"),
                                    name=joint)
    report, files = write_grouped_report(lines, files, {joint: select(rows, joint=joint) for joint in preset.cross_joint_targets},
                                         results.header.get("unlabeled_pools") or {}, rows, out)
    return report, files, headline


def _data_line(preset: BenchPreset, header: dict) -> str:
    """Which denoisers were tested on which joints: the user's source and target, or the synthetic ones."""
    user = header.get("user_data") or {}
    source = header.get("pretrained_on", "knee")
    if user.get("labeled"):
        return (f"Source: {source} denoisers (`{header['source_denoisers']}`); target: the user's labeled "
                f"{', '.join(user['targets'])} archive `{user['labeled']}` ({user['studies']} studies of "
                f"{user['patients']} patients); preset `{preset.name}` for the network and training lengths")
    targets = ", ".join(f"{j} ({preset.studies[j]} synthetic studies)" for j in preset.cross_joint_targets)
    if user:
        return f"Source: the given {source} denoisers (`{header['source_denoisers']}`); targets {targets}"
    return (f"Preset `{preset.name}`: knee pretraining on a separate archive of "
            f"{preset.unlabeled_studies.get('knee', 0)} unlabeled synthetic knee studies; targets {targets}")


def _user_data_lines(header: dict) -> list[str]:
    """Where the user's source denoisers come from, and what the checks of the user's data named."""
    user = header.get("user_data")
    if not user:
        return []
    pool = (header.get("unlabeled_pools") or {}).get(header.get("pretrained_on"), {})
    lines = [pretraining_provenance(pool), ""] if pool else []
    if user.get("notes"):
        lines += ["## The user's data: what the checks named", "", *[f"- {note}" for note in user["notes"]], ""]
    return lines
