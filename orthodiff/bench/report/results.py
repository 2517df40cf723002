"""results.json (one row per method x fraction x seed), its summaries over seeds, and report tables.

Summaries pool the seeds: the point is the mean over seeds; the 95% interval is a bootstrap of that
seed-mean over both seeds and test patients (each replicate draws the seeds with replacement, then
scores every drawn seed's run on the same resample of the test patients), read from the runs'
predictions, so it holds the seed variance as well as the test-set uncertainty; the seed spread is
also given apart. Comparisons between two methods are paired: the same bootstrap resamples give an
interval for the difference. Where a run directory is gone, the
interval falls back to the mean of the seeds' own intervals (said so in the table).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import OrthodiffError
from ...fileio import read_json, write_json

FORMAT = "orthodiff-bench-results"
VERSION = 1


@dataclass
class ResultsFile:
    """results.json: header (bench, preset, command, config) and rows keyed by cell key; saved after
    every cell, so an interrupted bench resumes at the first missing cell."""

    path: Path
    header: dict
    rows: list = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, header: dict) -> ResultsFile:
        path = Path(path)
        if not path.exists():
            return cls(path, header, [])
        stored = read_json(path)
        if stored.get("format") != FORMAT:
            raise OrthodiffError(f"{path}: not a bench results file; give another --out folder")
        for key in ("bench", "preset"):
            if stored.get(key) != header.get(key):
                raise OrthodiffError(
                    f"{path}: holds {key} {stored.get(key)!r}, this run is {header.get(key)!r}; "
                    "give another --out folder or delete it"
                )
        opened = cls(path, {**stored, **header, "format": FORMAT, "version": VERSION}, list(stored.get("rows", [])))
        if any(stored.get(key) != value for key, value in opened.header.items()):
            opened.save()  # the file describes what this run's report shows (a re-counted pool, a report command)
        return opened

    def has(self, key: str) -> bool:
        return any(row["key"] == key for row in self.rows)

    def add(self, row: dict) -> None:
        row = dict(row)
        try:  # relative to results.json, so a copied bench folder still finds its runs
            row["run_dir"] = str(Path(row["run_dir"]).resolve().relative_to(self.path.parent.resolve()))
        except ValueError:
            pass
        self.rows = [r for r in self.rows if r["key"] != row["key"]] + [row]
        self.save()

    def save(self) -> None:
        write_json(self.path, {**self.header, "format": FORMAT, "version": VERSION, "rows": self.rows})


# ------------------------------------------------------------------------------ pooled summaries
def _test_patient_scores(run_dir: Path, labels: list[str]):
    """{label: {patient: (prob, target)}} on the test split, as evaluation aggregates them."""
    import pandas as pd

    from ...evaluation.classification import patient_scores

    frame = pd.read_csv(Path(run_dir) / "predictions.csv", dtype={"patient_id": str, "study_id": str})
    frame = frame[frame["split"] == "test"]
    out = {}
    for label in labels:
        ids, probs, targets = patient_scores(frame, label)
        out[label] = (ids, probs, targets)
    return out


def _test_patient_dice(run_dir: Path) -> dict:
    """{structure: {patient: Dice}} on the test split: evaluation's per-series scores, averaged per patient."""
    from ...evaluation.rundir import read_run
    from ...evaluation.segmentation import series_scores, structure_names

    inputs = read_run(run_dir)
    structures = structure_names(inputs.classes, inputs.segmentations)
    scores, _ = series_scores(inputs.segmentations[inputs.segmentations["split"] == "test"], structures,
                              distances=False)
    if scores.empty:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_patient = scores.groupby("patient_id")[[f"dice_{s}" for s in structures]].mean()
    return {s: {str(p): float(v) for p, v in per_patient[f"dice_{s}"].items()} for s in structures}


@dataclass
class Pooled:
    """A seed-mean with its patient-bootstrap interval and replicates (for paired differences)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    seed_sd: float | None
    n_seeds: int
    replicates: np.ndarray | None = None
    interval: str = "seed and patient bootstrap of the seed mean"

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "seed_sd": self.seed_sd,
                "n_seeds": self.n_seeds, "interval": self.interval}


class Pooler:
    """Pools rows over seeds with one fixed set of bootstrap resamples of the test patients, so all
    pooled values of one (joint, scenario, task) share resamples and differences are paired."""

    def __init__(self, rows: list, n_bootstrap: int, seed: int = 0, root: Path | None = None,
                 resample_seeds: bool = True, headline_labels: list | None = None):
        self.rows, self.n_bootstrap, self.seed = rows, int(n_bootstrap), int(seed)
        self.root = Path(root) if root is not None else Path(".")  # run_dir values are relative to it
        # False: patients only (the seeds' runs averaged in every replicate), for comparison
        self.resample_seeds = bool(resample_seeds)
        # the classification macro averages these labels only (None: every label with a defined AUROC)
        self.headline_labels = list(headline_labels) if headline_labels is not None else None
        self._counts: dict = {}
        self._seed_counts: dict = {}
        self._cache: dict = {}

    def _seed_resamples(self, seeds: tuple) -> np.ndarray:
        """(n_bootstrap, len(seeds)) draw counts; one set per seed list, so pools over the same seeds
        draw the same seeds in a replicate and differences stay paired."""
        if seeds not in self._seed_counts:
            from ...evaluation.bootstrap import resample_counts

            if self.resample_seeds:
                self._seed_counts[seeds] = resample_counts(len(seeds), self.n_bootstrap, self.seed + 1)
            else:
                self._seed_counts[seeds] = np.ones((self.n_bootstrap, len(seeds)))
        return self._seed_counts[seeds]

    def _resamples(self, group: tuple, patients: np.ndarray) -> np.ndarray:
        if group not in self._counts:
            from ...evaluation.bootstrap import resample_counts

            self._counts[group] = (patients, resample_counts(patients.size, self.n_bootstrap, self.seed))
        known, counts = self._counts[group]
        if not np.isin(patients, known).all():
            raise ValueError("runs of one group were tested on different patients")
        return counts[:, np.searchsorted(known, patients)]

    def pooled(self, rows: list, label: str | None = None) -> Pooled:
        """The seed mean of the rows' macro AUROC (mean Dice for segmentation), or of one label's
        AUROC, with its patient-bootstrap interval."""
        if not rows:
            return Pooled(None, None, None, None, 0)
        cache_key = (tuple(sorted(r["key"] for r in rows)), label)
        if cache_key in self._cache:
            return self._cache[cache_key]
        if label is not None:
            estimates = [r["auroc"].get(label, {}) for r in rows]
        elif rows[0]["task"] == "classify" and self.headline_labels is not None:
            estimates = [_headline_macro(r, self.headline_labels) for r in rows]
        else:
            metric = "macro_auroc" if rows[0]["task"] == "classify" else "mean_dice"
            estimates = [r[metric] for r in rows]
        values = [e["value"] for e in estimates if e.get("value") is not None]
        point = float(np.mean(values)) if values else None
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
        try:
            replicates = self._replicates(rows, label)
        except (OSError, OrthodiffError, KeyError, ValueError):
            replicates = None
        if replicates is not None and np.isfinite(replicates).any():
            from ...evaluation.bootstrap import percentile_interval

            low, high, _ = percentile_interval(replicates)
            result = Pooled(point, low, high, sd, len(values), replicates,
                            "seed and patient bootstrap of the seed mean" if self.resample_seeds
                            else "patient bootstrap of the seed mean")
        else:
            lows = [e["ci_low"] for e in estimates if e.get("ci_low") is not None]
            highs = [e["ci_high"] for e in estimates if e.get("ci_high") is not None]
            result = Pooled(point, float(np.mean(lows)) if lows else None, float(np.mean(highs)) if highs else None,
                            sd, len(values), None, "mean of the seeds' intervals")
        self._cache[cache_key] = result
        return result

    def _replicates(self, rows: list, label: str | None = None) -> np.ndarray | None:
        """(n_bootstrap,) seed-mean metric (macro, or ``label``'s AUROC) per resample of the seeds and
        the test patients."""
        from ...evaluation.bootstrap import seed_and_patient_replicates, weighted_auroc, weighted_mean

        # one label's pool may see fewer patients (unknown labels) than the macro: its own resamples
        group = (rows[0]["joint"], rows[0]["scenario"], rows[0]["task"], label)
        per_seed, seeds = [], []
        for row in rows:
            run_dir = self.root / row["run_dir"]
            if row["task"] == "classify":
                wanted = [label] if label is not None else self.headline_labels
                labels = [name for name, est in row["auroc"].items() if est["value"] is not None
                          and (wanted is None or name in wanted)]
                if not labels:
                    continue
                scores = _test_patient_scores(run_dir, labels)
                patients = np.array(sorted(set().union(*[set(s[0]) for s in scores.values()])), dtype=str)
                counts = self._resamples(group, patients)
                per_label = []
                for ids, probs, targets in scores.values():
                    weights = counts[:, np.searchsorted(patients, ids)]
                    per_label.append(weighted_auroc(probs, targets, weights))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_seed.append(np.nanmean(np.vstack(per_label), axis=0))
                seeds.append(int(row.get("seed", len(seeds))))
            else:
                dice = _test_patient_dice(run_dir)
                if not dice:
                    continue
                patients = np.array(sorted(next(iter(dice.values()))), dtype=str)
                counts = self._resamples(group, patients)
                # as evaluation aggregates: per structure over patients, then the mean over structures
                per_structure = [weighted_mean(np.array([values[p] for p in patients]), counts)
                                 for values in dice.values()]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_seed.append(np.nanmean(np.vstack(per_structure), axis=0))
                seeds.append(int(row.get("seed", len(seeds))))
        if not per_seed:
            return None
        order = np.argsort(seeds, kind="stable")
        counts = self._seed_resamples(tuple(int(seeds[i]) for i in order))
        return seed_and_patient_replicates(np.vstack([per_seed[i] for i in order]), counts)

    def difference(self, a: list, b: list) -> dict | None:
        """Paired seed-mean difference a - b with its 95% interval (None without replicates)."""
        from ...evaluation.bootstrap import percentile_interval

        first, second = self.pooled(a), self.pooled(b)
        if first.value is None or second.value is None:
            return None
        diff = {"value": first.value - second.value, "ci_low": None, "ci_high": None}
        if first.replicates is not None and second.replicates is not None:
            low, high, used = percentile_interval(first.replicates - second.replicates)
            if used:
                diff.update(ci_low=low, ci_high=high)
        return diff


def _headline_macro(row: dict, labels: list) -> dict:
    """A row's macro AUROC over ``labels`` only (its own interval covers every label, so it is dropped)."""
    values = [row["auroc"][name]["value"] for name in labels
              if row["auroc"].get(name, {}).get("value") is not None]
    return {"value": float(np.mean(values)) if values else None}


def select(rows: Iterable[dict], **where) -> list:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def fmt(estimate: dict | None, digits: int = 3) -> str:
    """``0.812 [0.741, 0.880]``; ``-`` when undefined."""
    if not estimate or estimate.get("value") is None:
        return "-"
    text = f"{estimate['value']:.{digits}f}"
    if estimate.get("ci_low") is not None and estimate.get("ci_high") is not None:
        text += f" [{estimate['ci_low']:.{digits}f}, {estimate['ci_high']:.{digits}f}]"
    return text


def fmt_pooled(pooled: Pooled) -> str:
    text = fmt(pooled.as_dict())
    if pooled.seed_sd is not None:
        text += f" ±{pooled.seed_sd:.3f}"
    return text


def grid_validation(root: Path, rows: list) -> str:
    """The mean over ``rows`` of the validation macro AUROC their probes were chosen by (run.json's
    ``grid.best``, or a single probe's ``best_val_macro_auroc``: its early-stopping point), formatted;
    "n/a" when no row's run recorded one."""
    scores = []
    for row in rows:
        info = read_json(Path(root) / row["run_dir"] / "run.json")
        score = ((info.get("grid") or {}).get("best") or {}).get("val_macro_auroc", info.get("best_val_macro_auroc"))
        if score is not None:
            scores.append(float(score))
    return f"{sum(scores) / len(scores):.3f}" if scores else "n/a"


def clearly_above(diff: dict | None) -> bool:
    """The paired difference's whole interval lies above 0."""
    return bool(diff) and diff.get("ci_low") is not None and diff["ci_low"] > 0


def fmt_diff(diff: dict | None) -> str:
    if not diff:
        return "-"
    text = f"{diff['value']:+.3f}"
    if diff.get("ci_low") is not None:
        text += f" [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
    return text
