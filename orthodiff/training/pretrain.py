"""``orthodiff pretrain``: one denoiser per plane, trained through Accelerate.

The loop is written out in the manner of the diffusers training examples: Accelerate owns
devices, precision, gradient accumulation, multi-process and checkpoint state; diffusers owns
the noise schedule, the LR schedule and the EMA. Every random draw of the loop (which volumes,
which timesteps, which noise) is a function of (seed, plane, micro-batch, rank), so a run
resumed from a checkpoint produces the same losses and weights as one that never stopped.

Layout of ``pretrain.output_dir``::

    config.yaml                       the resolved config
    denoisers/<plane>/                config.json + model.safetensors (EMA weights)
    <plane>/checkpoints/step-XXXXXX/  training state as safetensors + JSON (model, optimizer, LR, EMA,
                                      RNG, step; see ``checkpoints``), never pickle
    <plane>/metrics.jsonl             loss, lr, grad_norm, volumes_per_s per logged step
    <plane>/previews/step-XXXXXX.png  mid-slices: inputs, noised inputs, DDIM samples
    <plane>/wandb/ or <plane>/logs/   tracker files
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import ExperimentConfig, config_to_dict, save_config
from ..errors import OrthodiffError
from ..models.denoiser import ARCHITECTURE_FIELDS, Denoiser, check_denoiser_config, check_plane_size, describe
from ..models.diffusion import (
    check_diffusion_config,
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    training_target,
)
from ..planes import PLANES
from .checkpoints import (
    ResumableState,
    TrainingProgress,
    check_resumable,
    list_checkpoints,
    resumable_checkpoint,
    resume_note,
    save_checkpoint,
)
from .patches import DrawKeyedBatches, crop_seed, plane_patch_size
from .precision import PRECISIONS, choose_mixed_precision
from .sampling import StepSeededBatchSampler, derived_seed, step_generator
from .tracking import (
    MetricsLog,
    accelerate_log_with,
    check_tracker,
    flat_config,
    log_image,
    prepare_wandb_environment,
    tracker_init_kwargs,
)

MIXED_PRECISION = PRECISIONS
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def run_pretraining(cfg: ExperimentConfig) -> dict[str, Path]:
    """Train the denoiser of ``cfg.pretrain.plane`` (or all three in turn); return their directories.

    Every input is checked for every plane before the first step of the first plane.
    """
    planes = resolve_planes(cfg.pretrain.plane, held=cached_planes(cfg))
    check_pretrain_config(cfg)
    datasets = {plane: open_plane_dataset(cfg, plane) for plane in planes}
    output_dir = Path(cfg.pretrain.output_dir)
    from accelerate import PartialState

    for plane in planes:
        if cfg.pretrain.resume:
            latest = resumable_checkpoint(output_dir / plane / "checkpoints")
            if latest is not None:
                check_resumable(latest[1], run_info(cfg, plane), PartialState().num_processes)

    if PartialState().is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    return {plane: train_plane(cfg, plane, datasets[plane]) for plane in planes}


# ---------------------------------------------------------------------------------- checks
def resolve_planes(plane: str, held=None) -> list[str]:
    """The planes to train; ``all`` means the planes the cache holds (``held``) when known."""
    if plane == "all":
        return [p for p in PLANES if p in held] if held else list(PLANES)
    if plane not in PLANES:
        raise OrthodiffError(f"pretrain.plane={plane!r}: use one of {', '.join(PLANES)} or all")
    return [plane]


def check_pretrain_config(cfg: ExperimentConfig) -> None:
    """One line naming the first bad ``pretrain.*`` / ``model.*`` / ``diffusion.*`` value."""
    p = cfg.pretrain
    positive = {
        "batch_size": p.batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "max_steps": p.max_steps,
        "checkpoint_every": p.checkpoint_every,
        "keep_checkpoints": p.keep_checkpoints,
        "log_every": p.log_every,
    }
    for name, value in positive.items():
        if int(value) < 1:
            raise OrthodiffError(f"pretrain.{name}={value}: must be at least 1")
    if not p.learning_rate > 0:
        raise OrthodiffError(f"pretrain.learning_rate={p.learning_rate}: must be positive")
    if int(p.warmup_steps) < 0 or int(p.preview_every) < 0:
        raise OrthodiffError("pretrain.warmup_steps and pretrain.preview_every must be 0 or more (0: no previews)")
    if not 0 < p.ema_decay < 1:
        raise OrthodiffError(f"pretrain.ema_decay={p.ema_decay}: must be between 0 and 1, e.g. 0.995")
    if p.mixed_precision not in MIXED_PRECISION:
        raise OrthodiffError(f"pretrain.mixed_precision={p.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
    if p.lr_scheduler not in LR_SCHEDULERS:
        raise OrthodiffError(f"pretrain.lr_scheduler={p.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    if p.augment:
        raise OrthodiffError("pretrain.augment=true is not supported yet; pretraining reads the prepared volumes as they are")
    if int(p.preview_count) < 1:
        raise OrthodiffError(f"pretrain.preview_count={p.preview_count}: must be at least 1")
    check_tracker(p.tracker)
    levels = len(check_denoiser_config(cfg.model))
    for plane in resolve_planes(p.plane):
        if plane not in cfg.data.plane_size:
            raise OrthodiffError(f"data.plane_size has no entry for {plane}; add data.plane_size.{plane}=[D,H,W]")
        check_plane_size(cfg.data.plane_size[plane], levels, plane)
    check_diffusion_config(cfg.diffusion)


def cached_planes(cfg: ExperimentConfig) -> list[str]:
    """Planes with selected series in ``data.cache`` (empty when there is no cache yet: the
    dataset check then says what to do)."""
    from ..data.cache import PlaneCache
    from ..data.selection import select_cache

    if not (Path(cfg.data.cache) / "cache.json").exists():
        return []
    cache = select_cache(PlaneCache(cfg.data.cache), cfg.data.series, one_per_plane=False)
    return [p for p in PLANES if (cache.index["plane"] == p).any()]


def open_plane_dataset(cfg: ExperimentConfig, plane: str):
    """The plane's training volumes: train + val patients of the splits file, or every patient. With a
    held-out loss (``pretrain.eval_every`` > 0) the val patients are what it scores, so they are left
    out of training: a loss on volumes the model learned from would not show when it stops generalising."""
    from ..data.cache import PlaneCache
    from ..data.datasets import PlaneVolumeDataset
    from ..data.selection import select_cache

    root = Path(cfg.data.cache)
    if not (root / "cache.json").exists():
        raise OrthodiffError(f"data.cache={root}: no prepared cache there; run `orthodiff prepare MANIFEST --out {root}`")
    # pretraining learns from every series that passes the filters (all echoes, all candidates)
    cache = select_cache(PlaneCache(root), cfg.data.series, one_per_plane=False)
    cache.check_plane_size(cfg.data.plane_size)
    cache.check_slab(cfg.data.slab)
    patients = None
    splits_path = Path(cfg.data.splits)
    if splits_path.exists():
        from ..data.splits import load_splits

        splits = load_splits(splits_path)
        cache.check_splits(splits)
        patients = list(splits.train) + ([] if int(cfg.pretrain.eval_every) > 0 else list(splits.val))
    dataset = PlaneVolumeDataset(cache, plane, patient_ids=patients, patch_size=plane_patch_size(cfg, plane),
                                 seed=crop_seed(cfg.seed, plane))
    cache.check_tensors(dataset.series_ids)
    if len(dataset) == 0:
        who = "train" if int(cfg.pretrain.eval_every) > 0 else "train/val"
        whose = f" of the {who} patients of {splits_path}" if patients is not None else ""
        raise OrthodiffError(
            f"data.cache={root}: no prepared {plane} volumes{whose}; prepare that plane or choose another pretrain.plane"
        )
    return dataset


def resolve_mixed_precision(setting: str) -> str:
    """``pretrain.mixed_precision`` as Accelerate takes it (``precision.choose_mixed_precision``)."""
    return choose_mixed_precision(setting, "pretrain.mixed_precision")


def run_info(cfg: ExperimentConfig, plane: str) -> dict:
    """What a checkpoint must match to be resumed (architecture, plane, size, objective)."""
    model = dataclasses.asdict(cfg.model)
    return {
        "plane": plane,
        "plane_size": [int(s) for s in cfg.data.plane_size[plane]],
        "model": {name: _plain(model[name]) for name in ARCHITECTURE_FIELDS},
        "diffusion": {k: _plain(v) for k, v in dataclasses.asdict(cfg.diffusion).items() if k != "sample_steps"},
        "seed": int(cfg.seed),
        "batch_size": int(cfg.pretrain.batch_size),
        "gradient_accumulation_steps": int(cfg.pretrain.gradient_accumulation_steps),
        # None for whole planes, so checkpoints written before crops existed still resume
        "patch_size": None if (patch := plane_patch_size(cfg, plane)) is None else list(patch),
    }


# ------------------------------------------------------------------------------- training
def train_plane(cfg: ExperimentConfig, plane: str, dataset) -> Path:
    """Train one plane's denoiser to ``pretrain.max_steps`` (resuming when it can); export EMA weights."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader

    p = cfg.pretrain
    output_dir = Path(p.output_dir)
    plane_dir = output_dir / plane
    checkpoint_dir = plane_dir / "checkpoints"
    stream = PLANES.index(plane)
    if p.tracker == "wandb":
        prepare_wandb_environment()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(p.mixed_precision),
        gradient_accumulation_steps=int(p.gradient_accumulation_steps),
        log_with=accelerate_log_with(p.tracker),
        project_config=ProjectConfiguration(project_dir=str(plane_dir), logging_dir=str(plane_dir / "logs")),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    model = initial_denoiser(cfg, plane)
    ema = EMAModel(model.parameters(), decay=float(p.ema_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(p.learning_rate), weight_decay=float(p.weight_decay))
    # A prepared scheduler advances once per process per step, hence the scaling (as in diffusers).
    lr_scheduler = get_scheduler(
        p.lr_scheduler,
        optimizer,
        num_warmup_steps=int(p.warmup_steps) * world,
        num_training_steps=int(p.max_steps) * world,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema.to(device)
    progress = TrainingProgress()
    state = ResumableState(accelerator, model, optimizer, lr_scheduler, ema, progress)

    info = run_info(cfg, plane)
    metrics = MetricsLog(plane_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    latest = resumable_checkpoint(checkpoint_dir) if p.resume else None
    if latest is not None:
        check_resumable(latest[1], info, world)
        state.load(latest[1])
        ema.to(device)
        accelerator.print(f"pretrain {plane}: " + resume_note(*latest))
    elif accelerator.is_main_process and list_checkpoints(checkpoint_dir):
        accelerator.print(f"pretrain {plane}: pretrain.resume=false, removing old checkpoints in {checkpoint_dir}")
        shutil.rmtree(checkpoint_dir)
    metrics.truncate_after(progress.step)
    accelerator.wait_for_everyone()

    if p.tracker != "none":
        run_name = cfg.tracking.run_name or f"pretrain-{plane}"
        accelerator.init_trackers(
            cfg.tracking.project,
            config=flat_config(config_to_dict(cfg)),
            init_kwargs=tracker_init_kwargs(p.tracker, plane_dir, run_name),
        )
    accelerator.print(describe(accelerator.unwrap_model(model)) + f"; {len(dataset)} volumes; {world} process(es)")

    sampler = StepSeededBatchSampler(
        len(dataset),
        int(p.batch_size),
        seed=derived_seed(cfg.seed, stream),
        rank=rank,
        world_size=world,
        start_micro_batch=progress.step * int(p.gradient_accumulation_steps),
    )
    loader = DataLoader(
        dataset,
        batch_sampler=DrawKeyedBatches(sampler) if dataset.patch_size else sampler,
        num_workers=int(cfg.data.num_workers),
        pin_memory=device.type == "cuda",
    )
    noise_scheduler = make_noise_scheduler(cfg.diffusion)
    loop = _Loop(cfg, plane, accelerator, model, ema, optimizer, lr_scheduler, noise_scheduler, progress, metrics)
    loop.state = state
    try:
        loop.run(iter(loader), checkpoint_dir, info, last_checkpoint=latest[1] if latest else None)
        accelerator.wait_for_everyone()
        destination = output_dir / "denoisers" / plane
        if accelerator.is_main_process:
            export_ema(accelerator.unwrap_model(model), ema, destination)
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
        accelerator.free_memory()
    accelerator.print(f"pretrain {plane}: EMA weights in {destination}")
    return destination


def initial_denoiser(cfg: ExperimentConfig, plane: str) -> Denoiser:
    """The untrained denoiser of a plane: the same weights on every rank, a different start per plane."""
    torch.manual_seed(derived_seed(cfg.seed, PLANES.index(plane)))
    return Denoiser(cfg.model, plane, cfg.data.plane_size[plane], cfg.diffusion)


def export_ema(model: Denoiser, ema, destination: Path) -> Path:
    """Save the EMA weights as a from_pretrained checkpoint, leaving the raw weights in place."""
    parameters = list(model.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        model.save_pretrained(destination)
    finally:
        ema.restore(parameters)
    return destination


class _Loop:
    """The step loop of one plane; separate from setup so each part reads top to bottom."""

    def __init__(self, cfg, plane, accelerator, model, ema, optimizer, lr_scheduler, noise_scheduler, progress, metrics):
        self.cfg, self.plane, self.accelerator = cfg, plane, accelerator
        self.model, self.ema, self.optimizer, self.lr_scheduler = model, ema, optimizer, lr_scheduler
        self.noise_scheduler, self.progress, self.metrics = noise_scheduler, progress, metrics
        self.stream = PLANES.index(plane)

    def run(self, batches, checkpoint_dir: Path, info: dict, last_checkpoint: Optional[Path]) -> None:
        p, accelerator = self.cfg.pretrain, self.accelerator
        self.last_checkpoint = last_checkpoint
        self.heldout = self.make_heldout()
        self.finite = FiniteWatch(accelerator.device)
        bar = tqdm_bar(p.max_steps, self.progress.step, self.plane, accelerator.is_main_process)
        window = self.progress.window  # restored on resume: the first row after it averages the same steps
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        while self.progress.step < p.max_steps:
            loss, grad_norm, clean = self.train_step(batches)
            self.progress.step += 1
            step = self.progress.step
            window.append(loss)
            window_steps += 1
            bar.update(1)
            due = {
                "log": step % p.log_every == 0 or step == p.max_steps,
                "preview": bool(p.preview_every) and step % p.preview_every == 0,
                "heldout": self.heldout is not None and (step % p.eval_every == 0 or step == p.max_steps),
                "checkpoint": step % p.checkpoint_every == 0 or step == p.max_steps,
            }
            if any(due.values()):  # nothing non-finite is logged, shown or saved
                self.stop_unless_finite()
            if due["log"]:
                record = self.log(step, window, grad_norm, window_steps, time.perf_counter() - window_start)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window.clear()
                window_start, window_steps = time.perf_counter(), 0
            if due["preview"]:
                self.preview(step, clean)
            if due["heldout"]:
                self.evaluate_heldout(step)
            if due["checkpoint"]:
                self.last_checkpoint = save_checkpoint(
                    accelerator, checkpoint_dir, step, info, int(p.keep_checkpoints), self.state
                )
        bar.close()

    def train_step(self, batches):
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        p, accelerator, scheduler = self.cfg.pretrain, self.accelerator, self.noise_scheduler
        device, accumulation = accelerator.device, int(p.gradient_accumulation_steps)
        step = self.progress.step
        losses, grad_norm = [], None
        for micro in range(accumulation):
            clean = next(batches).to(device, non_blocking=True)
            generator = step_generator(self.cfg.seed, self.stream, step * accumulation + micro, accelerator.process_index, device)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=device
            )
            noise = torch.randn(clean.shape, generator=generator, device=device, dtype=clean.dtype)
            with accelerator.accumulate(self.model):
                noisy = scheduler.add_noise(clean, noise, timesteps)
                prediction = self.model(noisy, timesteps)
                target = training_target(scheduler, clean, noise, timesteps)
                loss = diffusion_loss(prediction, target, min_snr_weights(scheduler, timesteps, self.cfg.diffusion.min_snr_gamma))
                self.finite.note(loss, "loss", step + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = float(p.max_grad_norm) if p.max_grad_norm and p.max_grad_norm > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                    self.finite.note(torch.as_tensor(grad_norm), "gradient norm", step + 1)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if not accelerator.sync_gradients:  # guards the invariant the step counter relies on
            raise RuntimeError("gradient accumulation ended without a synchronising micro-batch")
        self.ema.step(self.model.parameters())
        return torch.stack(losses).mean(), grad_norm, clean

    def stop_unless_finite(self) -> None:
        found = self.finite.first_on_any_process(self.accelerator)
        if found is None:
            return
        what, value, step = found
        kept = f"the last checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else "no checkpoint was written yet"
        raise OrthodiffError(
            f"pretrain {self.plane}: {what} is {value} at step {step}; stopped without saving ({kept}); "
            "lower pretrain.learning_rate or check the prepared volumes for NaN"
        )

    def log(self, step: int, losses: list, grad_norm, steps: int, seconds: float) -> dict:
        accelerator, p = self.accelerator, self.cfg.pretrain
        loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
        volumes = steps * int(p.batch_size) * int(p.gradient_accumulation_steps) * accelerator.num_processes
        record = {
            "step": step,
            "loss": loss,
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "volumes_per_s": volumes / max(seconds, 1e-9),
        }
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        self.metrics.write({"plane": self.plane, **record})
        return record

    def make_heldout(self):
        """The held-out loss scorer (``training.heldout``) of this process's share of the volumes, or None
        when off; built on every rank, so a missing validation split stops them all."""
        from .heldout import make_heldout

        accelerator = self.accelerator
        return make_heldout(self.cfg, self.plane, accelerator.device, accelerator.process_index,
                            accelerator.num_processes)

    def evaluate_heldout(self, step: int) -> None:
        from .heldout import evaluate_heldout

        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            loss = evaluate_heldout(self.heldout, model, self.ema, step, self.plane, self.metrics,
                                    Path(self.cfg.pretrain.output_dir) / self.plane, self.accelerator)
        self.accelerator.log({"heldout/loss": loss}, step=step)

    def preview(self, step: int, clean: torch.Tensor) -> None:
        """Main process only: a picture from the EMA weights (raw weights restored after)."""
        accelerator = self.accelerator
        if not accelerator.is_main_process:
            return
        from .previews import preview_grid, save_png

        model = accelerator.unwrap_model(self.model)
        parameters = list(model.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        model.eval()
        try:
            with accelerator.autocast():
                image = preview_grid(model, self.cfg.diffusion, clean[: int(self.cfg.pretrain.preview_count)].float(), self.cfg.seed)
        finally:
            model.train()
            self.ema.restore(parameters)
        directory = Path(self.cfg.pretrain.output_dir) / self.plane / "previews"
        save_png(image, directory / f"step-{step:06d}.png")
        log_image(accelerator, "preview", image, step)


class FiniteWatch:
    """The first step whose loss or gradient norm was not finite, noted on the device: checking it
    every micro-batch would wait for the GPU each time, so the loop reads it only before it logs, shows
    or saves anything (a step's weights after a NaN are never saved)."""

    WHAT = ("loss", "gradient norm")

    def __init__(self, device) -> None:
        # (step, what, value); step 0: every value so far was finite
        self.first = torch.zeros(3, dtype=torch.float32, device=device)

    def note(self, value: torch.Tensor, what: str, step: int) -> None:
        value = value.detach().reshape(()).to(self.first.dtype)
        entry = torch.stack([torch.full_like(value, step), torch.full_like(value, self.WHAT.index(what)), value])
        self.first = torch.where((self.first[0] == 0) & ~torch.isfinite(value), entry, self.first)

    def first_on_any_process(self, accelerator) -> Optional[tuple[str, float, int]]:
        """(what, value, step) of the earliest non-finite value of every process, or None."""
        noted = accelerator.gather(self.first.reshape(1, 3)).cpu()
        noted = noted[noted[:, 0] > 0]
        if not len(noted):
            return None
        step, what, value = noted[int(noted[:, 0].argmin())].tolist()
        return self.WHAT[int(what)], value, int(step)


def tqdm_bar(total: int, initial: int, plane: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"pretrain {plane}", disable=not enabled, dynamic_ncols=True)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
