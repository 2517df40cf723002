"""Experiment tracking through Accelerate trackers, plus a ``metrics.jsonl`` that is always written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import OrthodiffError

TRACKERS = ("wandb", "tensorboard", "none")


def check_tracker(name: str) -> str:
    if name not in TRACKERS:
        raise OrthodiffError(f"pretrain.tracker={name!r}: use one of {', '.join(TRACKERS)}")
    return name


def accelerate_log_with(name: str) -> Optional[str]:
    """The ``log_with`` argument of ``Accelerator`` for a tracker name."""
    return None if check_tracker(name) == "none" else name


def prepare_wandb_environment() -> None:
    """Run wandb offline unless the user configured it (an API key or an explicit mode)."""
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")


def tracker_init_kwargs(name: str, run_dir: Path, run_name: str) -> dict:
    if name == "wandb":
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return {"wandb": {"dir": str(run_dir), "name": run_name}}
    return {}


def flat_config(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become strings (tensorboard hparams take scalars)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = value
    return flat


def log_image(accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """Send an RGB uint8 image (H, W, 3) to whichever tracker is active."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.run.log({tag: wandb.Image(image)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        from ..fileio import write_text

        write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
