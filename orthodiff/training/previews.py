"""Preview pictures during pretraining: what the denoiser sees and what it can generate.

One row per example: the mid-slice of a clean input, the same input noised at a middle
timestep, and a short DDIM sample from pure noise (seeded, so previews are comparable over time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DiffusionConfig
from ..fileio import atomic_path
from ..models.diffusion import make_noise_scheduler, make_sampling_scheduler
from .sampling import derived_seed

COLUMNS = ("input", "noised t={t}", "DDIM sample")


@torch.no_grad()
def ddim_sample(model, diffusion: DiffusionConfig, shape, seed: int, device) -> torch.Tensor:
    """Unconditional samples with ``diffusion.sample_steps`` DDIM steps, from seeded noise."""
    scheduler = make_sampling_scheduler(diffusion)
    generator = torch.Generator(device=device).manual_seed(derived_seed(seed, 7919))
    sample = torch.randn(shape, generator=generator, device=device)
    for timestep in scheduler.timesteps:
        t = torch.full((shape[0],), int(timestep), device=device, dtype=torch.long)
        prediction = model(sample, t).float()
        sample = scheduler.step(prediction, timestep, sample).prev_sample
    return sample.clamp(-1, 1)


@torch.no_grad()
def preview_grid(model, diffusion: DiffusionConfig, inputs: torch.Tensor, seed: int) -> np.ndarray:
    """An RGB uint8 picture (H, W, 3) of mid-slices: inputs | noised | DDIM samples."""
    device = inputs.device
    scheduler = make_noise_scheduler(diffusion)
    t_mid = int(diffusion.num_train_timesteps) // 2
    generator = torch.Generator(device=device).manual_seed(derived_seed(seed, 104729))
    noise = torch.randn(inputs.shape, generator=generator, device=device)
    timesteps = torch.full((inputs.shape[0],), t_mid, device=device, dtype=torch.long)
    noised = scheduler.add_noise(inputs, noise, timesteps)
    samples = ddim_sample(model, diffusion, tuple(inputs.shape), seed, device)
    return _render([inputs, noised, samples], [c.format(t=t_mid) for c in COLUMNS])


def _render(columns: list[torch.Tensor], titles: list[str]) -> np.ndarray:
    from ..plotting import pyplot

    plt = pyplot()
    rows = columns[0].shape[0]
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    for col, (volumes, title) in enumerate(zip(columns, titles)):
        for row in range(rows):
            volume = volumes[row, 0].float().cpu().numpy()
            axis = axes[row][col]
            axis.imshow(volume[volume.shape[0] // 2], cmap="gray", vmin=-1, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)
