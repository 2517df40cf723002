"""Training-state checkpoints: ``<plane dir>/checkpoints/step-XXXXXX`` via ``accelerator.save_state``.

A checkpoint is written into a hidden temporary folder and renamed when every process has
finished, so a crash never leaves a half checkpoint that resume would pick up. Each holds
``run.json`` describing what was trained, so a resume with another model is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from ..errors import OrthodiffError
from ..fileio import read_json, write_json

RUN_INFO = "run.json"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``directory`` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / RUN_INFO).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Optional[tuple[int, Path]]:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


class TrainingProgress:
    """The optimizer-step counter, registered with Accelerate so it travels with each checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def save_checkpoint(accelerator, directory: Path, step: int, run_info: dict, keep: int) -> Path:
    """Save the accelerator state at ``step`` on every process; the main process publishes and prunes."""
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    staging = directory / f".{checkpoint_name(step)}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(staging / RUN_INFO, {**run_info, "step": step})
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resumable(path: Path, run_info: dict) -> None:
    """Refuse to resume from a checkpoint of another model, plane or objective (one line)."""
    saved = read_json(Path(path) / RUN_INFO)
    for key in ("plane", "plane_size", "model", "diffusion"):
        if saved.get(key) != run_info.get(key):
            detail = _first_difference(saved.get(key), run_info.get(key))
            raise OrthodiffError(
                f"{path}: checkpoint was made with another {key} ({detail}); use another "
                "pretrain.output_dir, or pretrain.resume=false to start over there"
            )


def _first_difference(saved, wanted) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted)):
            if saved.get(key) != wanted.get(key):
                return f"{key} {saved.get(key)} in the checkpoint vs {wanted.get(key)} now"
    return f"{saved} in the checkpoint vs {wanted} now"
