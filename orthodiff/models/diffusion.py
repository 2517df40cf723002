"""The diffusion objective: diffusers schedulers, loss targets and min-SNR weighting.

The schedulers own the maths (noise schedule, ``add_noise``, ``get_velocity``, sampling); this
module only chooses them from the config and turns a prediction into a loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import DiffusionConfig
from ..errors import OrthodiffError

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


def check_diffusion_config(cfg: DiffusionConfig) -> DiffusionConfig:
    """Raise a one-line OrthodiffError naming the bad ``diffusion.*`` field."""
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise OrthodiffError(
            f"diffusion.prediction_type={cfg.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
        )
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise OrthodiffError(f"diffusion.beta_schedule={cfg.beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")
    if int(cfg.num_train_timesteps) < 2:
        raise OrthodiffError(f"diffusion.num_train_timesteps={cfg.num_train_timesteps}: must be at least 2")
    if cfg.min_snr_gamma is not None and not float(cfg.min_snr_gamma) > 0:
        raise OrthodiffError(f"diffusion.min_snr_gamma={cfg.min_snr_gamma}: must be positive, or null for no weighting")
    if not 1 <= int(cfg.sample_steps) <= int(cfg.num_train_timesteps):
        raise OrthodiffError(
            f"diffusion.sample_steps={cfg.sample_steps}: must be between 1 and num_train_timesteps"
        )
    return cfg


def make_noise_scheduler(cfg: DiffusionConfig):
    """The training scheduler: diffusers ``DDPMScheduler`` (cosine schedule by default)."""
    from diffusers import DDPMScheduler

    check_diffusion_config(cfg)
    return DDPMScheduler(
        num_train_timesteps=int(cfg.num_train_timesteps),
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def make_sampling_scheduler(cfg: DiffusionConfig):
    """A ``DDIMScheduler`` with the training schedule, set to ``cfg.sample_steps`` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(make_noise_scheduler(cfg).config)
    scheduler.set_timesteps(int(cfg.sample_steps))
    return scheduler


def training_target(scheduler, samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network should predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(samples, noise, timesteps)
    raise OrthodiffError(f"diffusion.prediction_type={prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: Optional[float]) -> Optional[torch.Tensor]:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023), or None without gamma.

    For epsilon the weight is min(SNR, gamma) / SNR; for v-prediction min(SNR, gamma) / (SNR + 1).
    """
    if gamma is None:
        return None
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=float(gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error per sample, weighted over the batch when ``weights`` is given."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def denoising_loss(
    model: torch.nn.Module,
    scheduler,
    samples: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    gamma: Optional[float] = None,
) -> torch.Tensor:
    """The training loss of ``model`` on clean ``samples`` at given timesteps and noise."""
    noisy = scheduler.add_noise(samples, noise, timesteps)
    prediction = model(noisy, timesteps)
    target = training_target(scheduler, samples, noise, timesteps)
    return diffusion_loss(prediction, target, min_snr_weights(scheduler, timesteps, gamma))
