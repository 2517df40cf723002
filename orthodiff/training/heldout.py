"""The denoising loss on held-out volumes, comparable from one step to the next.

The volumes (the first ``pretrain.eval_volumes`` series of the validation patients), the timesteps
(evenly spread over the schedule) and the noise (seeded per volume and timestep) are fixed for the
whole run, so a change of the number is a change of the model, not of the draw. The EMA weights
are scored, as they are the weights that are exported and read for features. Records go into
``<plane>/metrics.jsonl`` as ``{"plane", "step", "heldout_loss"}``; ``<plane>/heldout_loss.png``
plots them beside the training loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OrthodiffError
from ..planes import PLANES
from .sampling import derived_seed

TIMESTEPS = 8  # evenly spread over the schedule: the loss differs by orders of magnitude across t
NOISE_STREAM = 7919  # keeps the held-out noise apart from every training draw
PLOT_NAME = "heldout_loss.png"


def heldout_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> list[int]:
    """``count`` timesteps at the centres of equal slices of [0, T)."""
    total = int(num_train_timesteps)
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def heldout_series(cfg, plane: str) -> list[str]:
    """Series ids of the held-out volumes: the validation patients' ``plane`` series, in order."""
    from ..data.cache import PlaneCache
    from ..data.splits import load_splits

    splits_path = Path(cfg.data.splits)
    if not splits_path.exists():
        raise OrthodiffError(
            f"pretrain.eval_every={cfg.pretrain.eval_every}: held-out volumes come from the val patients of "
            f"{splits_path}, which does not exist; run `orthodiff split` first or set pretrain.eval_every=0"
        )
    val = list(load_splits(splits_path).val)
    series = sorted(PlaneCache(cfg.data.cache).series(plane, val)["series_id"]) if val else []
    if not series:
        raise OrthodiffError(
            f"pretrain.eval_every={cfg.pretrain.eval_every}: {splits_path} has no val patient with a prepared {plane} "
            "series; write splits with a positive val_fraction or set pretrain.eval_every=0"
        )
    return series[: max(1, int(cfg.pretrain.eval_volumes))]


class HeldoutLoss:
    """Scores a denoiser on fixed held-out volumes, timesteps and noise (built once per run).

    On several processes each scores its share of the volumes (``rank``, ``processes``) and
    ``evaluate_heldout`` adds the shares up, so no GPU holds them all and none waits long for the
    others. Volumes and noise stay on the CPU and go to ``device`` ``pretrain.batch_size`` at a time.
    """

    def __init__(self, cfg, plane: str, device, rank: int = 0, processes: int = 1):
        from ..data.cache import PlaneCache
        from ..data.datasets import _as_float32
        from ..models.diffusion import make_noise_scheduler

        if int(cfg.pretrain.eval_volumes) < 1:
            raise OrthodiffError(f"pretrain.eval_volumes={cfg.pretrain.eval_volumes}: must be at least 1")
        cache = PlaneCache(cfg.data.cache)
        self.series = heldout_series(cfg, plane)
        self.device = torch.device(device)
        self.batch_size = max(1, int(cfg.pretrain.batch_size))
        self.scheduler = make_noise_scheduler(cfg.diffusion)
        self.timesteps = heldout_timesteps(cfg.diffusion.num_train_timesteps)
        self.gamma = cfg.diffusion.min_snr_gamma
        mine = range(int(rank), len(self.series), int(processes))
        self.volumes = [_as_float32(cache.image(self.series[index])) for index in mine]
        # (timesteps, 1, D, H, W) per volume, seeded by the volume's place in the list: the same numbers
        # however the volumes are shared out, on every device
        self.noise = [
            torch.randn((len(self.timesteps), *volume.shape), generator=torch.Generator().manual_seed(
                derived_seed(cfg.seed, PLANES.index(plane), NOISE_STREAM, index)))
            for index, volume in zip(mine, self.volumes)
        ]

    @torch.no_grad()
    def totals(self, model) -> torch.Tensor:
        """(sum of the per-volume losses over timesteps and this process's volumes, their count) on ``device``."""
        from ..models.diffusion import denoising_loss

        was_training = model.training
        model.eval()
        total = torch.zeros(2, device=self.device)
        try:
            for start in range(0, len(self.volumes), self.batch_size):
                volumes = torch.stack(self.volumes[start:start + self.batch_size]).to(self.device)
                noise = torch.stack(self.noise[start:start + self.batch_size], dim=1).to(self.device)
                for index, t in enumerate(self.timesteps):
                    timesteps = torch.full((len(volumes),), t, dtype=torch.long, device=self.device)
                    loss = denoising_loss(model, self.scheduler, volumes, timesteps, noise[index], self.gamma)
                    total[0] += loss.float() * len(volumes)
                    total[1] += len(volumes)
        finally:
            model.train(was_training)
        return total

    def __call__(self, model) -> float:
        """Mean over timesteps and volumes of the training objective (this process's volumes)."""
        loss, count = self.totals(model).tolist()
        return loss / count


def evaluate_heldout(heldout: HeldoutLoss, model, ema, step: int, plane: str, metrics, plane_dir: Path,
                     accelerator=None) -> float:
    """Score the EMA weights (raw weights restored after) on every process's share, add the shares up;
    the main process logs the record and redraws the plot."""
    parameters = list(model.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        totals = heldout.totals(model)
    finally:
        ema.restore(parameters)
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss, count = totals.tolist()
    loss = loss / count
    if accelerator is None or accelerator.is_main_process:
        metrics.write({"plane": plane, "step": int(step), "heldout_loss": loss})
        plot_heldout(Path(plane_dir) / "metrics.jsonl", Path(plane_dir) / PLOT_NAME, plane)
    return loss


def plot_heldout(metrics_path: Path, png_path: Path, plane: str) -> Path | None:
    """Training loss and held-out loss against steps (log scale); None when nothing is logged yet."""
    from ..plotting import pyplot, save_png
    from .tracking import read_metrics

    records = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    heldout = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
    if not heldout:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if train:
        ax.plot(*zip(*train), color="0.6", linewidth=1, label="training loss (batch)")
    ax.plot(*zip(*heldout), "o-", color="C0", markersize=3, label="held-out loss (val volumes, fixed t and noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss")
    ax.set_yscale("log")
    ax.set_title(f"pretraining, {plane}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, Path(png_path))


def make_heldout(cfg, plane: str, device, rank: int = 0, processes: int = 1) -> HeldoutLoss | None:
    """The run's held-out scorer (this process's share), or None when ``pretrain.eval_every`` is 0."""
    every = int(cfg.pretrain.eval_every)
    if every < 0:
        raise OrthodiffError(f"pretrain.eval_every={every}: must be 0 (never) or a number of steps")
    return HeldoutLoss(cfg, plane, device, rank, processes) if every else None
