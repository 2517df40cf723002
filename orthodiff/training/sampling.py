"""Randomness that depends only on (seed, step), never on how many steps ran in this process.

This is what makes a resumed run continue exactly: the micro-batch ``m`` always holds the same
volumes and the same noise and timesteps, whether the run started at step 0 or at a checkpoint.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence mixes them well)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def step_generator(seed: int, stream: int, micro_batch: int, rank: int, device: torch.device | str) -> torch.Generator:
    """The generator for one micro-batch on one rank (noise and timesteps)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(seed, stream, micro_batch, rank))
    return generator


class StepSeededBatchSampler:
    """An endless stream of index batches, sharded over ranks, starting at any micro-batch.

    The volumes are visited epoch by epoch, each epoch in a permutation seeded by (seed, epoch).
    Global micro-batch ``m`` takes items ``[m*W*B, (m+1)*W*B)`` of that stream and rank ``r``
    keeps its own ``B`` of them, so every rank sees different volumes.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_micro_batch: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("StepSeededBatchSampler needs at least one item")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_micro_batch = start_micro_batch
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng(derived_seed(self.seed, epoch)).permutation(self.num_items)}
        return self._permutations[epoch]

    def batch(self, micro_batch: int) -> list[int]:
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        return [int(self._permutation(p // self.num_items)[p % self.num_items]) for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        micro_batch = self.start_micro_batch
        while True:
            yield self.batch(micro_batch)
            micro_batch += 1
