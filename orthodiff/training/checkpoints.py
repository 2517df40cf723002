"""Training-state checkpoints: ``<plane dir>/checkpoints/step-XXXXXX``, safetensors + JSON only.

Accelerate's ``save_state``/``load_state`` pickle the registered objects and the RNG states, and
unpickling a tampered folder runs its code. So the resumable state is written here instead:

    model.safetensors               raw (non-EMA) weights
    optimizer.safetensors/.json     optimizer state (moments, step counts, parameter groups)
    scheduler.json                  LR schedule position
    ema.safetensors/.json           EMA shadow weights and counters
    scaler.json                     fp16 loss-scaler state (fp16 runs only)
    rng-<rank>.safetensors/.json    Python, NumPy and torch RNG states of each process
    window-<rank>.safetensors/.json each process's losses since the last logged step
    run.json                        what was trained, the step, and size + sha256 of every file

A checkpoint is written into a hidden temporary folder and renamed when every process has
finished, so a crash never leaves a half checkpoint; ``run.json`` is written last. Resume takes
the newest checkpoint whose files all match their recorded size and hash, and says which
damaged ones it passed over. Nothing here ever unpickles: any ``*.pkl`` in a folder is ignored.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import OrthodiffError
from ..fileio import read_json, sha256_file, write_json
from .state_files import load_state, save_state

RUN_INFO = "run.json"
CHECKPOINT_FORMAT = "orthodiff-training-state"
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
    """The optimizer-step counter, saved with each checkpoint, and this process's losses of the steps
    since the last logged one (the next log row averages them, so a resumed run logs what an
    uninterrupted one does)."""

    def __init__(self) -> None:
        self.step = 0
        self.window: list = []

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class ResumableState:
    """Everything a resumed run needs to continue bit for bit: model, optimizer, LR schedule, EMA,
    step and RNG states. The sampler position follows from the step (see ``sampling``)."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, ema, progress: TrainingProgress):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.lr_scheduler, self.ema, self.progress = lr_scheduler, ema, progress

    def save(self, folder: Path) -> list[str]:
        """Write this process's part into ``folder``; the file names written."""
        from safetensors.torch import save_file

        from ..fileio import atomic_path

        accelerator = self.accelerator
        rank = accelerator.process_index
        files = save_state(folder, f"rng-{rank}", _rng_state())
        files += save_state(folder, f"window-{rank}", {"losses": [loss.detach() for loss in self.progress.window]})
        if not accelerator.is_main_process:
            return files
        weights = accelerator.unwrap_model(self.model).state_dict()
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp))
        files.append("model.safetensors")
        files += save_state(folder, "optimizer", self.optimizer.state_dict())
        files += save_state(folder, "scheduler", self.lr_scheduler.state_dict())
        files += save_state(folder, "ema", self.ema.state_dict())
        if accelerator.scaler is not None:
            files += save_state(folder, "scaler", accelerator.scaler.state_dict())
        return files

    def load(self, folder: Path) -> None:
        """Read every part first (so a damaged file changes nothing), then apply them."""
        from safetensors.torch import load_file

        accelerator = self.accelerator
        info = read_json(folder / RUN_INFO)
        weights = load_file(str(folder / "model.safetensors"))
        optimizer = load_state(folder, "optimizer")
        scheduler = load_state(folder, "scheduler")
        ema = load_state(folder, "ema")
        scaler = load_state(folder, "scaler") if (folder / "scaler.json").exists() else None
        rank = accelerator.process_index
        rng = load_state(folder, f"rng-{rank}") if (folder / f"rng-{rank}.json").exists() else None
        window = load_state(folder, f"window-{rank}")["losses"] if (folder / f"window-{rank}.json").exists() else []

        accelerator.unwrap_model(self.model).load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer)
        self.lr_scheduler.load_state_dict(scheduler)
        self.ema.load_state_dict(ema)
        if scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(scaler)
        self.progress.step = int(info["step"])
        self.progress.window = [loss.to(accelerator.device) for loss in window]
        # Accelerate counts micro-batches to decide when gradients synchronise
        accelerator.step = self.progress.step * int(accelerator.gradient_accumulation_steps)
        if rng is not None:
            _set_rng_state(rng)


def save_checkpoint(accelerator, directory: Path, step: int, run_info: dict, keep: int, state: ResumableState) -> Path:
    """Save the state at ``step`` on every process; the main process publishes and prunes. A process that
    cannot write its part (a full disk) stops every process, and the half-written folder is removed."""
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    staging = directory / f".{checkpoint_name(step)}.tmp"
    failure = None
    try:
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        state.save(staging)
    except OSError as exc:
        failure = exc
    if not _every_process_succeeded(accelerator, failure is None):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise failure or OrthodiffError(
            f"{staging}: another process could not write its part of the step-{step} checkpoint (see its error); "
            "free disk space and resume"
        )
    if accelerator.is_main_process:
        try:
            files = {path.name: _file_record(path) for path in sorted(staging.iterdir()) if path.is_file()}
            info = {"format": CHECKPOINT_FORMAT, **run_info, "step": step, "world_size": accelerator.num_processes}
            write_json(staging / RUN_INFO, {**info, "files": files})
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _every_process_succeeded(accelerator, succeeded: bool) -> bool:
    if accelerator.num_processes == 1:
        return succeeded
    import torch

    failures = accelerator.reduce(torch.tensor([0.0 if succeeded else 1.0], device=accelerator.device), reduction="sum")
    return failures.item() == 0


def damage(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be resumed, or None when every file is intact."""
    path = Path(path)
    try:
        info = read_json(path / RUN_INFO)
    except (OSError, ValueError) as exc:
        return f"{RUN_INFO} is unreadable ({exc.__class__.__name__})"
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT or not isinstance(info.get("files"), dict):
        return "it is in an older format (Accelerate's pickled state), which orthodiff never loads"
    for name in ("model.safetensors", "optimizer.json", "scheduler.json", "ema.json"):
        if name not in info["files"]:
            return f"{RUN_INFO} lists no {name}"
    for name, expected in info["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("bytes"):
            return f"{name} is {file.stat().st_size} bytes, {expected.get('bytes')} were written"
        if sha256_file(file) != expected.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def resumable_checkpoint(directory: Path) -> Optional[tuple[int, Path, list[str]]]:
    """The newest intact checkpoint as (step, path, notes on newer damaged ones); None when there
    is no checkpoint. Checkpoints that are all damaged are one line naming the newest and why."""
    checkpoints = list_checkpoints(directory)
    notes = []
    for step, path in reversed(checkpoints):
        reason = damage(path)
        if reason is None:
            return step, path, notes
        notes.append(f"{path.name} is damaged ({reason})")
    if not checkpoints:
        return None
    raise OrthodiffError(
        f"{directory}: no intact checkpoint to resume from ({'; '.join(notes)}); delete the damaged folders "
        "or set pretrain.resume=false to start over"
    )


def resume_note(step: int, path: Path, notes: list[str]) -> str:
    """One line: where a run resumes, and which damaged checkpoints it passed over."""
    text = f"resumed from {path} (step {step})"
    if notes:
        text += f"; skipped {', '.join(notes)}"
    return text


def check_resumable(path: Path, run_info: dict, processes: int) -> None:
    """Refuse to resume from a checkpoint of another model, plane or objective, or one written by another
    number of processes (one line). Each process draws its own batches and noise, and the LR schedule
    advances once per process per step, so a run continued on another count would not be the one saved."""
    saved = read_json(Path(path) / RUN_INFO)
    written_by = int(saved.get("world_size", 1))
    if written_by != int(processes):
        raise OrthodiffError(
            f"checkpoint {path} was written by {written_by} process{'es' if written_by != 1 else ''}, this run has "
            f"{processes}: resume with {written_by} process{'es' if written_by != 1 else ''}, or start a new output "
            "folder (pretrain.output_dir, or pretrain.resume=false to start over there)"
        )
    for key in ("plane", "plane_size", "patch_size", "model", "diffusion"):
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


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}




def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
