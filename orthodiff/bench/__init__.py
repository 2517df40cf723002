"""Benchmarks: what diffusion pretraining buys when labels are scarce, on a new joint, and across
sites and field strengths, against supervised baselines on the same splits and inputs.

``run_bench(name, preset, out, overrides)`` runs one bench's grid of cells (method x label
fraction x seed), resuming at the first cell missing from ``OUT/results.json``, then writes
``OUT/report.md`` and PNG plots. The benches synthesize their archives; ``user`` (a
``data.user_data.UserData``) points them at the user's own archives instead: a labeled archive, and a
pool to pretrain on or denoisers already pretrained (cross-joint: of the source joint; robustness:
with the domain held out).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import OrthodiffError
from .run_result import BenchResult

BENCHES = ("label-fraction", "cross-joint", "robustness")

log = logging.getLogger(__name__)


def run_bench(name: str, preset: str = "small", out: str | Path = "bench", overrides: Sequence[str] = (),
              user=None) -> BenchResult:
    """Run bench ``name`` at ``preset`` size into ``out``; ``overrides`` are preset fields
    (``seeds=[0,1]``) or ExperimentConfig keys (``pretrain.max_steps=100``); ``user`` the user's
    archives and denoisers (``data.user_data.UserData``)."""
    from .data.user_data import UserData
    from .presets import resolve_preset

    if name not in BENCHES:
        raise OrthodiffError(f"bench {name!r} is unknown; use one of {', '.join(BENCHES)}")
    user = user or UserData()
    user.check(name)
    spec, _ = resolve_preset(preset, list(overrides))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["orthodiff", "bench", name, "--preset", preset, "--out", str(out),
                        *[shlex.join(o.split(" ", 1)) for o in user.options()], *[shlex.quote(o) for o in overrides]])
    header = {"bench": name, "preset": preset, "overrides": list(overrides), "command": command,
              "python": sys.version.split()[0]}
    if not spec.run_cells:  # a report-only rerun keeps the command that computed the rows
        header = {"bench": name, "preset": preset, "report_command": command}
    if spec.threads:
        import torch

        torch.set_num_threads(int(spec.threads))
    start = time.perf_counter()
    if name == "label-fraction":
        from .label_fraction import run_label_fraction as runner
    elif name == "cross-joint":
        from .cross_joint import run_cross_joint as runner
    else:
        from .robustness import run_robustness as runner
    result = runner(spec, out, header, user)
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["BENCHES", "BenchResult", "run_bench"]
