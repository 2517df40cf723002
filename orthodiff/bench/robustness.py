"""``orthodiff bench robustness``: train on some sites or field strengths, test on the others.

Each scenario holds one domain out (a site, or a field strength): its patients are removed from
training and validation and added to the test set, beside the ordinary test patients of the seen
domains. Pretraining, too, sees only the seen domains: the separate unlabeled knee archive less
its patients of the held-out domain (cached like every bench pretraining). Metrics are reported per
site and per field strength, so the unseen domain can be read against the seen ones.

On the user's archive the one scenario holds out ``--held-out COLUMN=VALUE`` of any manifest column
(``domains.HeldOut``); each run is also scored on that domain's test patients and on the others
(``by_held_out``), since a run's own metrics are split by site and field strength only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import read_json, write_json
from .cells.cell import Cell, CellInputs
from .cells.grid import run_grid, stage
from .data.domains import HeldOut, values_present
from .data.user_data import UserData, archive_size, prepare_user_joint, pretraining_provenance, user_pretraining
from .data.workspace import prepare_joint, write_domain_splits
from .presets import PRETRAINED_METHODS, BenchPreset
from .report import plots
from .report.learnability import learnability_lines
from .report.protocol import counts_from_dict, label_counts, protocol_lines
from .report.results import Pooler, ResultsFile, fmt_pooled, select
from .report.training_report import write_grouped_report

BENCH = "robustness"
JOINT = "knee"
HELD_OUT_STRATA = "by_held_out"  # a user's held-out domain and the rest, in rows and scenario specs


def robustness_cells(preset: BenchPreset, joint: str = JOINT) -> list[Cell]:
    return [Cell(joint, scenario, "classify", method, 1.0, int(seed))
            for seed in preset.seeds for scenario in preset.robustness for method in preset.methods]


def run_robustness(preset: BenchPreset, out: Path, header: dict, user: UserData | None = None):
    """The bench on the synthetic archive's scenarios, or on the user's labeled archive with the
    domain ``user.held_out`` (COLUMN=VALUE) held out."""
    from ..data.manifest import read_manifest
    from .data.pretraining import pool_pretraining
    from .run_result import BenchResult

    user = user or UserData()
    notes, domain, extra = [], None, {}
    if user.labeled:
        data, notes = stage(BENCH, "data (scan, prepare, split of the labeled archive)",
                            lambda: prepare_user_joint(preset, out, user))
        manifest = Path(data.config.data.manifest)
        domain = HeldOut.parse(user.held_out).as_spelled_in(read_manifest(manifest), manifest)
        preset = replace(preset, robustness={domain.name: {"column": domain.column, "held_out": domain.value,
                                                           "strata": HELD_OUT_STRATA}})
    else:
        data = stage(BENCH, "data (synth, scan, prepare, split)", lambda: prepare_joint(preset, out, JOINT))

    splits, pretrained, pools, shortfalls = {}, {}, {}, {}
    needs_pretraining = any(m in PRETRAINED_METHODS for m in preset.methods)
    for scenario, spec in preset.robustness.items():
        path = data.root / f"splits-{scenario}.json"
        splits[scenario] = (write_held_out_splits(data, domain, path) if domain is not None
                            else write_domain_splits(data, spec["column"], spec["held_out"], path))
        shortfalls[scenario] = []
        if needs_pretraining and user.given:
            pretrained[scenario], pools[scenario], shortfalls[scenario] = stage(
                BENCH, f"pretraining for {scenario} checked (user data, {domain} left out)",
                lambda s=scenario: user_pretraining(preset, out, user, data, splits=splits[s], domain=domain))
        elif needs_pretraining:
            pretrained[scenario], pools[scenario] = stage(
                BENCH, f"pretraining for {scenario} (unlabeled archive, seen domains only)",
                lambda s=scenario, spec=spec: pool_pretraining(
                    preset, out, JOINT, data.config, [(data.config.data.manifest, splits[s])],
                    exclude=(spec["column"], spec["held_out"]), name=s))
    counts = {s: label_counts(path, data.config.data.manifest, preset.min_test_positives).as_dict()
              for s, path in splits.items()}
    if user.given:
        held = {s: read_json(path)["domain_shift"]["held_out_patients"] for s, path in splits.items()}
        extra = {"user_data": {**user.as_dict(), "held_out": str(domain), "joint": data.joint, "held_out_patients": held,
                               **archive_size(data.config.data.manifest), "notes": notes}}
    for line in notes + [line for lines in shortfalls.values() for line in lines]:
        print(f"[orthodiff bench {BENCH}] protocol: {line}", flush=True)
    results = ResultsFile.open(out / "results.json", {**header, "scenarios": preset.robustness,
                                                      "unlabeled_pools": pools, "label_counts": counts,
                                                      "shortfalls": shortfalls, **extra})

    def inputs_for(cell: Cell) -> CellInputs:
        return data.cell_inputs(cell.seed, pretrained.get(cell.scenario), splits=splits[cell.scenario],
                                tag=cell.scenario)

    computed = run_grid(robustness_cells(preset, data.joint), inputs_for, preset, results, BENCH)
    if domain is not None:
        add_held_out_strata(results, domain, Path(data.config.data.manifest), preset.n_bootstrap)
    report, files, headline = write_robustness_report(results, preset, out)
    return BenchResult(name=BENCH, out=out, rows=results.rows, computed=computed, headline=headline,
                       files=[results.path, report, *files])


def write_held_out_splits(data, domain: HeldOut, out: Path) -> Path:
    """Splits with ``domain`` held out of the user's archive: its patients (any series of it) leave
    train and val and join the test set, beside the seen domains' test patients."""
    from ..data.manifest import read_manifest
    from ..data.splits import load_splits

    if out.exists():
        return out
    manifest = Path(data.config.data.manifest)
    frame = read_manifest(manifest)
    held = domain.check(frame, manifest)
    splits = load_splits(data.splits)
    train = [p for p in splits.train if p not in held]
    val = [p for p in splits.val if p not in held]
    if not train or not val:
        patients = frame["patient_id"].nunique()
        raise OrthodiffError(f"--held-out {domain}: {len(held)} of the {patients} patients are of it, which leaves no "
                             f"training or validation patient; hold out a smaller domain "
                             f"(values present: {values_present(frame, domain.column)})")
    stored = read_json(data.splits)
    stored.update(train=train, val=val, test=sorted(set(splits.test) | held), subsets={"1": train},
                  val_subsets={"1": val}, domain_shift={"column": domain.column, "held_out": domain.value,
                                                        "held_out_patients": len(held)})
    write_json(out, stored)
    load_splits(out)  # checks disjointness
    return out


def add_held_out_strata(results: ResultsFile, domain: HeldOut, manifest: Path, n_bootstrap: int) -> None:
    """Give each row without them the macro AUROC of its held-out domain's test patients and of the
    other test patients (patient bootstrap intervals), read from the run's predictions: the metrics
    of a run are by site and field strength only, and a domain may be any column."""
    from ..data.manifest import read_manifest

    held = domain.patients(read_manifest(manifest))
    rows = [row if HELD_OUT_STRATA in row else {**row, HELD_OUT_STRATA: _held_out_strata(
        results.path.parent / row["run_dir"], held, domain, n_bootstrap)} for row in results.rows]
    if rows != results.rows:
        results.rows = rows
        results.save()


def _held_out_strata(run_dir: Path, held: set[str], domain: HeldOut, n_bootstrap: int) -> dict:
    import pandas as pd

    from ..evaluation.classification import classification_metrics

    frame = pd.read_csv(Path(run_dir) / "predictions.csv", dtype={"patient_id": str, "study_id": str})
    test = frame[frame["split"] == "test"]
    labels = [c[len("prob_"):] for c in test.columns if c.startswith("prob_")]
    thresholds = {label: {"value": 0.5} for label in labels}  # AUROC only: thresholds do not enter it
    in_domain = test["patient_id"].isin(held)
    strata = {}
    for name, group in ((str(domain), test[in_domain]), (f"other {domain.column}", test[~in_domain])):
        if group.empty:
            strata[name] = {"value": None, "ci_low": None, "ci_high": None, "reason": "no test patient"}
            continue
        macro = classification_metrics(group, labels, thresholds, n_bootstrap)["macro"]["auroc"]
        strata[name] = {key: macro.get(key) for key in ("value", "ci_low", "ci_high")}
    return strata


def _strata(spec: dict) -> tuple[str, str, str]:
    """(the rows' stratum that holds the held-out domain, the other stratum shown, the held-out
    domain's name in the first)."""
    if spec.get("strata") == HELD_OUT_STRATA:
        other = "by_field_strength" if spec["column"] == "site" else "by_site"
        return HELD_OUT_STRATA, other, f"{spec['column']}={spec['held_out']}"
    if spec["column"] == "site":
        return "by_site", "by_field_strength", str(spec["held_out"])
    return "by_field_strength", "by_site", f"{float(spec['held_out']):g}T"


def _stratum_mean(rows: list, stratum: str, name: str):
    """(mean over seeds, mean low, mean high) of one site's or field strength's macro AUROC."""
    points = [r[stratum][name] for r in rows if (r.get(stratum) or {}).get(name, {}).get("value") is not None]
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
    user = results.header.get("user_data")
    lines = [_title(user), "", f"Command: `{results.header.get('command', '')}`", "",
             (f"{_data_line(preset, user)}; seeds {preset.seeds}; "
             "100% of the seen domains' training labels. Per-domain values are the mean over "
             "seeds of each run's macro AUROC, brackets the mean of the runs' 95% patient-bootstrap intervals; "
             "the overall column pools seeds with one bootstrap of the seed mean over seeds and test patients. (unseen) marks the held-out domain."),
             "", *_user_data_lines(user, results.header.get("unlabeled_pools") or {})]
    files, headline = [], []
    for scenario, spec in preset.robustness.items():
        chosen = select(rows, scenario=scenario)
        if not chosen:
            continue
        # the overall column: the macro over this scenario's labels with enough test positives
        pooler = Pooler(rows, preset.n_bootstrap, root=results.path.parent,
                        headline_labels=(counts.get(scenario) or {}).get("headline_labels"))
        stratum, other, held = _strata(spec)
        names = sorted({n for r in chosen for n in r.get(stratum, {})})
        other_names = sorted({n for r in chosen for n in r[other]})
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        if counts.get(scenario):
            lines += protocol_lines(counts_from_dict(counts[scenario]),
                                    (results.header.get("shortfalls") or {}).get(scenario, []),
                                    preset.min_test_positives, name=scenario)
        lines += [f"## {scenario}: trained without {spec['column']} = {held.split('=', 1)[-1]}", "",
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


def _title(user: dict | None) -> str:
    if user:
        return f"# Robustness bench ({user['joint']}, the user's archive): unseen {user['held_out']}"
    return "# Robustness bench (knee): unseen sites and field strengths"


def _data_line(preset: BenchPreset, user: dict | None) -> str:
    if user:
        held = ", ".join(str(count) for count in user["held_out_patients"].values())
        return (f"The user's labeled archive `{user['labeled']}` ({user['studies']} studies of {user['patients']} "
                f"patients; {held} of them of {user['held_out']}, tested on and never trained on), preset "
                f"`{preset.name}` for the network and training lengths")
    return f"Preset `{preset.name}`: {preset.studies[JOINT]} synthetic knee studies"


def _user_data_lines(user: dict | None, pools: dict) -> list[str]:
    """Where the denoisers come from, and what the checks of the user's data named."""
    if not user:
        return []
    lines = [f"{pretraining_provenance(pool)}" for pool in pools.values()]
    lines = [*lines, ""] if lines else []
    if user.get("notes"):
        lines += ["## The user's data: what the checks named", "", *[f"- {note}" for note in user["notes"]], ""]
    return lines
