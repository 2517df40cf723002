"""Plane tensor + denoiser + timestep(s) + block names -> feature maps, reproducibly.

The noise that the denoiser sees comes from a generator seeded by (seed, study, plane, draw)
through a stable hash, so a study gives the same features on every run and every machine, and
the three planes of one study get different noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..errors import OrthodiffError


def noise_seed(seed: int, study_id: str, plane: str, draw: int = 0) -> int:
    """A 63-bit seed from sha256 of the key (Python's ``hash`` differs between processes)."""
    key = f"orthodiff-noise/{int(seed)}/{study_id}/{plane}/{int(draw)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def seeded_noise(shape: Sequence[int], seed: int, study_ids: Sequence[str], plane: str, draw: int = 0) -> torch.Tensor:
    """Noise (B, *shape) on the CPU, one generator per study (independent of batch composition)."""
    generator = torch.Generator(device="cpu")
    draws = []
    for study_id in study_ids:
        generator.manual_seed(noise_seed(seed, study_id, plane, draw))
        draws.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(draws)


def timestep_spec_name(spec: Sequence[int]) -> str:
    """'100', or '50+100+200' for features averaged over timesteps."""
    return "+".join(str(int(t)) for t in spec)


def timestep_specs(timesteps: Sequence[int], average: bool) -> list[tuple[int, ...]]:
    """One spec per timestep, or a single spec averaging them all."""
    timesteps = [int(t) for t in timesteps]
    return [tuple(timesteps)] if average else [(t,) for t in timesteps]


class FeatureExtractor:
    """Features of one plane's denoiser at ``timesteps`` x ``blocks``.

    ``average_timesteps`` averages the blocks' outputs over the timesteps (one spec); ``noise_draws``
    averages over that many seeded noise draws. Calling it returns {(block, spec_name): (B, C, d, h, w)}.
    Gradients flow when the caller enables them (fine-tuning); wrap in ``torch.no_grad`` to extract.
    """

    def __init__(
        self,
        denoiser,
        timesteps: Sequence[int],
        blocks: Sequence[str],
        seed: int = 0,
        noise_draws: int = 1,
        average_timesteps: bool = False,
    ):
        from ..models.diffusion import make_noise_scheduler

        self.denoiser = denoiser
        self.plane = denoiser.plane
        self.blocks = list(blocks)
        self.seed = int(seed)
        if not self.blocks:
            raise OrthodiffError("features.blocks is empty; name at least one of " + ", ".join(denoiser.block_names()))
        unknown = [block for block in self.blocks if block not in denoiser.block_names()]
        if unknown:
            raise OrthodiffError(
                f"features.blocks: {unknown[0]!r} is not a block of the denoiser; use one of {', '.join(denoiser.block_names())}"
            )
        total = int(denoiser.diffusion.num_train_timesteps)
        if not timesteps or any(not 0 <= int(t) < total for t in timesteps):
            raise OrthodiffError(f"features.timesteps={list(timesteps)}: give timesteps in [0, {total - 1}]")
        if int(noise_draws) < 1:
            raise OrthodiffError(f"features.noise_draws={noise_draws}: must be at least 1")
        self.noise_draws = int(noise_draws)
        self.specs = timestep_specs(timesteps, average_timesteps)
        self.scheduler = make_noise_scheduler(denoiser.diffusion)

    def feature_keys(self) -> list[tuple[str, str]]:
        """(block, timestep spec name) of every map a call returns."""
        return [(block, timestep_spec_name(spec)) for spec in self.specs for block in self.blocks]

    def __call__(self, images: torch.Tensor, study_ids: Sequence[str]) -> dict[tuple[str, str], torch.Tensor]:
        if images.dim() != 5 or images.shape[0] != len(study_ids):
            raise OrthodiffError(
                f"features: expected images (B, 1, D, H, W) with one study id each, got {tuple(images.shape)} "
                f"and {len(study_ids)} ids"
            )
        sums: dict[tuple[str, str], torch.Tensor] = {}
        for draw in range(self.noise_draws):
            noise = seeded_noise(images.shape[1:], self.seed, study_ids, self.plane, draw).to(images)
            for spec in self.specs:
                for t in spec:
                    timesteps = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
                    noisy = self.scheduler.add_noise(images, noise, timesteps)
                    for block, value in self.denoiser.features(noisy, timesteps, self.blocks).items():
                        key = (block, timestep_spec_name(spec))
                        sums[key] = value if key not in sums else sums[key] + value
        # Each key summed noise_draws x len(spec) maps; plain single-draw features pass unscaled.
        counts = {timestep_spec_name(spec): self.noise_draws * len(spec) for spec in self.specs}
        return {key: value if counts[key[1]] == 1 else value / counts[key[1]] for key, value in sums.items()}
