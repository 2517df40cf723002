"""Running a bench's cells in order, skipping those already in results.json."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from .cells import Cell, CellInputs, run_cell
from .presets import BenchPreset
from .results import ResultsFile


def run_grid(cells: Iterable[Cell], inputs_for: Callable[[Cell], CellInputs], preset: BenchPreset,
             results: ResultsFile, bench: str) -> int:
    """Run every cell missing from ``results`` (saved after each); returns how many ran."""
    cells = list(cells)
    computed = 0
    if not preset.run_cells:
        return computed
    for index, cell in enumerate(cells, 1):
        if results.has(cell.key):
            continue
        start = time.perf_counter()
        row = run_cell(cell, inputs_for(cell), preset)
        results.add(row)
        computed += 1
        metric = row.get("macro_auroc") or row.get("mean_dice") or {}
        value = metric.get("value")
        print(f"[orthodiff bench {bench}] {index}/{len(cells)} {cell.key}: "
              f"{'n/a' if value is None else f'{value:.3f}'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return computed


def stage(bench: str, what: str, function):
    """Run one data/pretraining stage with a progress line."""
    print(f"[orthodiff bench {bench}] {what} ...", flush=True)
    start = time.perf_counter()
    value = function()
    print(f"[orthodiff bench {bench}] {what}: {time.perf_counter() - start:.0f} s", flush=True)
    return value
