"""Running a bench's cells, skipping those already in results.json; on ``preset.workers`` processes
of one torch thread each when it is above 1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ..presets import BenchPreset
from ..report.results import ResultsFile
from .cell import Cell, CellInputs, run_cell


def run_grid(cells: Iterable[Cell], inputs_for: Callable[[Cell], CellInputs], preset: BenchPreset,
             results: ResultsFile, bench: str) -> int:
    """Run every cell missing from ``results`` (saved after each); returns how many ran."""
    cells = list(cells)
    if not preset.run_cells:
        return 0
    missing = [cell for cell in cells if not results.has(cell.key)]
    if int(preset.workers) > 1 and len(missing) > 1:
        return _run_parallel(missing, inputs_for, preset, results, bench, len(cells))
    for cell in missing:
        start = time.perf_counter()
        row = run_cell(cell, inputs_for(cell), preset)
        _record(results, row, bench, cells.index(cell) + 1, len(cells), time.perf_counter() - start)
    return len(missing)


def _record(results: ResultsFile, row: dict, bench: str, index: int, total: int, seconds: float) -> None:
    results.add(row)
    metric = row.get("macro_auroc") or row.get("mean_dice") or {}
    value = metric.get("value")
    print(f"[orthodiff bench {bench}] {index}/{total} {row['key']}: "
          f"{'n/a' if value is None else f'{value:.3f}'} ({seconds:.0f} s)", flush=True)


def _run_parallel(missing: list, inputs_for, preset: BenchPreset, results: ResultsFile, bench: str, total: int) -> int:
    """The groups of ``cell_groups`` run side by side, the cells of a group one after another in one
    process. Rows are saved by this process only, as groups finish (a cell whose run finished is only
    evaluated again on resume)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ...data.workers import one_thread_worker

    groups = cell_groups(missing)
    done = 0
    context = multiprocessing.get_context("spawn")  # no forked torch state
    # workers exit when this process dies: a killed bench leaves none training on
    with ProcessPoolExecutor(max_workers=int(preset.workers), mp_context=context, initializer=one_thread_worker,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_run_group, group, [inputs_for(c) for c in group], preset) for group in groups.values()]
        for future in as_completed(futures):
            for row, seconds in future.result():
                done += 1
                _record(results, row, bench, done, len(missing), seconds)
    return done


def cell_groups(cells: list) -> dict:
    """The probe cells of one (joint, scenario, method, seed) share a feature store: one group, so the
    store is extracted once and never written by two processes. Every other cell is a group of its own."""
    groups: dict = {}
    for cell in cells:
        shares_store = cell.task == "classify" and cell.method.startswith("orthodiff-probe")
        key = (cell.joint, cell.scenario, cell.method, cell.seed) if shares_store else cell.key
        groups.setdefault(key, []).append(cell)
    return groups


def _run_group(cells: list, inputs: list, preset: BenchPreset) -> list:
    rows = []
    for cell, cell_inputs in zip(cells, inputs):
        start = time.perf_counter()
        rows.append((run_cell(cell, cell_inputs, preset), time.perf_counter() - start))
    return rows


def stage(bench: str, what: str, function):
    """Run one data/pretraining stage with a progress line."""
    print(f"[orthodiff bench {bench}] {what} ...", flush=True)
    start = time.perf_counter()
    value = function()
    print(f"[orthodiff bench {bench}] {what}: {time.perf_counter() - start:.0f} s", flush=True)
    return value
