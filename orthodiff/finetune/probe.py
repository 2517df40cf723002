"""Probes on cached, frozen features: one head (``probe``) or a grid of heads trained over the
same batches (``grid``, as dinov2's linear evaluation).

The grid chooses features per plane, because the best (block, timestep) differs between planes:

1. *plane search*: for every plane, (block, timestep) and learning rate, a probe on that plane
   alone; a plane's (block, timestep) scores the best validation macro AUROC of its probes;
2. each plane keeps its best ``finetune.concat_features`` (block, timestep), concatenated;
3. *fused*: the full head on the chosen per-plane features, one per learning rate; the best on
   validation is the run's head.

Every cell trains on cached features, so the search costs seconds per cell, not denoiser passes.
Augmentation does not apply here: the features were computed once from the unaugmented tensors.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import OrthodiffError
from ..features.extractor import timestep_spec_name, timestep_specs
from ..features.selection import compose, key_name, parse_key
from ..heads import MultiLabelClassifier, masked_bce_loss, positive_weights
from ..planes import PLANES
from .scoring import MetricsLog, auroc_scores, patient_level
from .studies import RunStudies

SELECTION_RULE = (
    "per plane: each (block, timestep) scores the best validation macro AUROC over patients of its single-plane "
    "probes (one per learning rate); the plane keeps its best finetune.concat_features (ties: grid order); the "
    "fused head on the chosen features is then trained once per learning rate and the best on validation kept"
)


LOAD_CHUNK = 32  # studies read from a feature file at once
MEMORY_SHARE = 0.5  # the maps are held in memory when they need at most this share of the available memory


class CachedFeatures:
    """The store's maps of the run's studies, as float16.

    When every map the run reads (``keys``) fits in ``MEMORY_SHARE`` of the memory available (or in
    ``memory_budget`` bytes), the maps are held in memory, each loaded on first use. Otherwise each
    batch is read from the memory-mapped feature files, and the operating system's page cache keeps
    what fits: a store larger than the machine's memory trains too. Both give the same values.

    ``batch(selection, ...)`` gives each plane's composed map; a plane the study lacks (or the
    store lacks) is zeros with ``present`` False.
    """

    def __init__(self, store, studies: RunStudies, keys=None, memory_budget: float | None = None):
        self.store = store
        self.planes = store.planes
        self.count = len(studies.frame)
        self.present = np.zeros((self.count, len(PLANES)), dtype=bool)
        self.wanted: dict[str, np.ndarray] = {}
        for plane in self.planes:
            rows = store.rows(plane)
            row_of = dict(zip(rows["study_id"], rows["row"]))
            self.wanted[plane] = np.array([row_of.get(study_id, -1) for study_id in studies.frame["study_id"]],
                                          dtype=np.int64)
            self.present[self.wanted[plane] >= 0, PLANES.index(plane)] = True
        self.maps: dict[tuple[str, str], torch.Tensor] = {}
        keys = store.keys() if keys is None else keys
        needed = sum(self.count * math.prod(store.shape(plane, *key)) * 2 for plane in self.planes for key in keys)
        if memory_budget is None:
            import psutil

            memory_budget = MEMORY_SHARE * psutil.virtual_memory().available
        self.in_memory = needed <= memory_budget

    def map(self, plane: str, key: str) -> torch.Tensor:
        """(N, C, d, h, w) float16 of one plane's 'block@spec' for every study of the run."""
        if (plane, key) not in self.maps:
            wanted = self.wanted[plane]
            array = self.store.array(plane, *parse_key(key))
            maps = torch.zeros((self.count, *array.shape[1:]), dtype=torch.float16)
            have = np.flatnonzero(wanted >= 0)
            # a few studies at a time: reading every row at once would hold the whole map as float32 too
            for start in range(0, len(have), LOAD_CHUNK):
                part = have[start:start + LOAD_CHUNK]
                maps[part] = torch.from_numpy(np.asarray(array[wanted[part]], dtype=np.float16))
            self.maps[(plane, key)] = maps
        return self.maps[(plane, key)]

    def rows(self, plane: str, key: str, indices) -> torch.Tensor:
        """(len(indices), C, d, h, w) float16 of the run's studies at ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.in_memory:
            return self.map(plane, key)[torch.from_numpy(indices)]
        array = self.store.array(plane, *parse_key(key))
        out = np.zeros((len(indices), *array.shape[1:]), dtype=np.float16)
        wanted = self.wanted[plane][indices]
        have = wanted >= 0
        if have.any():
            order = np.argsort(wanted[have], kind="stable")  # ascending rows read the file forwards
            read = np.asarray(array[wanted[have][order]], dtype=np.float16)
            out[np.flatnonzero(have)[order]] = read
        return torch.from_numpy(out)

    def channels(self, selection: dict[str, list[str]]) -> dict[str, int]:
        return {plane: sum(int(self.store.shape(plane, *parse_key(key))[0]) for key in keys)
                for plane, keys in selection.items()}

    def batch(self, selection: dict[str, list[str]], indices, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        maps = {
            plane: compose([self.rows(plane, key, indices).to(device, torch.float32) for key in keys])
            for plane, keys in selection.items()
        }
        return maps, torch.from_numpy(self.present[np.asarray(indices)]).to(device)


@dataclass
class ProbeCell:
    """One head of a grid: its per-plane features, learning rate, model and best validation state."""

    selection: dict  # {plane: ["block@spec", ...]}
    learning_rate: float
    model: MultiLabelClassifier
    optimizer: torch.optim.Optimizer
    stage: str = "probe"  # probe, plane (single-plane search) or fused
    best_score: float = -np.inf
    best_epoch: int = -1
    best_step: int = -1
    stale: int = 0  # validations since the last improvement (finetune.patience)
    best_val_auroc: float | None = None
    best_state: dict = field(default_factory=dict)

    @property
    def features_name(self) -> str:
        return ";".join(f"{plane}={'+'.join(keys)}" for plane, keys in self.selection.items())

    @property
    def name(self) -> str:
        return f"{self.stage}:{self.features_name}/lr{self.learning_rate:g}"

    def describe(self) -> dict:
        described = {
            "stage": self.stage,
            "selection": {plane: list(keys) for plane, keys in self.selection.items()},
            "learning_rate": self.learning_rate,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "val_macro_auroc": self.best_val_auroc,
        }
        if self.stage == "plane":
            (plane, keys), = self.selection.items()
            block, spec = parse_key(keys[0])
            described.update(plane=plane, block=block, timestep=spec)
        return described


def probe_keys(cfg, grid: bool) -> list[tuple[str, str]]:
    """(block, timestep spec) pairs: all of ``features.blocks`` x timesteps for a grid; for a probe,
    the first ``finetune.concat_features`` of them (the first pair alone by default)."""
    specs = [timestep_spec_name(s) for s in timestep_specs(cfg.features.timesteps, cfg.features.average_timesteps)]
    keys = [(block, spec) for block in cfg.features.blocks for spec in specs]
    if grid:
        return keys
    return keys[: concat_count(cfg, len(keys))]


def concat_count(cfg, available: int) -> int:
    count = int(cfg.finetune.concat_features)
    if not 1 <= count <= available:
        raise OrthodiffError(
            f"finetune.concat_features={count}: must be between 1 and the {available} (block, timestep) pairs of "
            "features.blocks x features.timesteps"
        )
    return count


def train_probes(cfg, store, studies: RunStudies, log: MetricsLog, grid: bool):
    """Train the probe (or the grid's cells, stage by stage) for ``finetune.epochs`` each, each cell
    keeping its best validation epoch. Returns (best cell, all cells, CachedFeatures, grid record)."""
    ft = cfg.finetune
    keys = probe_keys(cfg, grid)
    count = concat_count(cfg, len(keys))
    store.require(keys)
    rates = [float(r) for r in (ft.grid_learning_rates if grid else [ft.learning_rate])]
    if not rates:
        raise OrthodiffError("finetune.grid_learning_rates is empty; give at least one learning rate")
    trainer = _Trainer(cfg, studies, CachedFeatures(store, studies, keys), log)
    names = [key_name(*key) for key in keys]
    if not grid:
        cells = trainer.fit([trainer.cell(dict.fromkeys(store.planes, names), rates[0], "probe")])
        return cells[0], cells, trainer.features, None

    record = {"selection": SELECTION_RULE, "planes": {}}
    chosen: dict[str, list[str]] = {}
    searched: list[ProbeCell] = []
    if len(names) == count:  # nothing to choose: every plane reads every pair
        chosen = {plane: list(names) for plane in store.planes}
    else:
        searched = trainer.fit([trainer.cell({plane: [name]}, rate, "plane")
                                for plane in store.planes for name in names for rate in rates])
        for plane in store.planes:
            mine = [cell for cell in searched if plane in cell.selection]
            scores = {name: max(cell.best_score for cell in mine if cell.selection[plane] == [name]) for name in names}
            ranked = sorted(names, key=lambda name: -scores[name])  # stable: grid order breaks ties
            chosen[plane] = ranked[:count]
            record["planes"][plane] = {
                "chosen": chosen[plane],
                "scores": {name: _plain_score(scores[name]) for name in names},
                "cells": [cell.describe() for cell in mine],
            }
    fused = trainer.fit([trainer.cell(chosen, rate, "fused") for rate in rates])
    best = max(fused, key=lambda c: c.best_score)  # first of equals: the grid's order breaks ties
    record["chosen"] = chosen
    record["fused"] = [cell.describe() for cell in fused]
    record["best"] = best.describe()
    return best, searched + fused, trainer.features, record


class _Trainer:
    """Trains cells over the same shuffled batches and keeps each one's best validation epoch."""

    def __init__(self, cfg, studies: RunStudies, features: CachedFeatures, log: MetricsLog):
        self.cfg, self.studies, self.features, self.log = cfg, studies, features, log
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.train_idx, self.val_idx = studies.where("train"), studies.where("val")
        if len(self.train_idx) == 0:
            raise OrthodiffError("the training subset has no study with prepared planes; check the cache and splits")
        self.labels = torch.from_numpy(studies.labels)
        self.ehr = torch.from_numpy(studies.ehr)
        ft = cfg.finetune
        self.pos_weight = positive_weights(self.labels[self.train_idx]).to(self.device) if ft.pos_weight else None
        self.batch_size = max(1, int(ft.batch_size))

    def cell(self, selection: dict, rate: float, stage: str) -> ProbeCell:
        ft = self.cfg.finetune
        torch.manual_seed(int(self.cfg.seed))  # every cell starts from the seed, whatever its place in the grid
        model = MultiLabelClassifier(
            self.features.channels(selection),
            self.studies.label_names,
            pooling=ft.pooling,
            fusion=ft.fusion,
            num_ehr=self.ehr.shape[1],
            use_ehr=ft.use_ehr,
            readout_grid=ft.readout_grid,
        ).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=float(ft.weight_decay))
        return ProbeCell(selection, rate, model, optimizer, stage)

    def fit(self, cells: list[ProbeCell]) -> list[ProbeCell]:
        """Train ``cells`` over the same shuffled batches; validate every ``finetune.eval_every`` optimizer
        steps (or once a pass), for ``finetune.max_steps`` steps (or ``finetune.epochs`` passes), stopping
        once every cell has gone ``finetune.patience`` validations without improving."""
        ft = self.cfg.finetune
        generator = torch.Generator().manual_seed(int(self.cfg.seed))
        steps_per_pass = -(-len(self.train_idx) // self.batch_size)
        total = int(ft.max_steps) if ft.max_steps else steps_per_pass * int(ft.epochs)
        every = int(ft.eval_every) if ft.max_steps and int(ft.eval_every) > 0 else steps_per_pass
        losses = {cell.name: [] for cell in cells}
        step, epoch = 0, 0
        while step < total:
            order = self.train_idx[torch.randperm(len(self.train_idx), generator=generator).numpy()]
            for start in range(0, len(order), self.batch_size):
                self._train_step(cells, order[start : start + self.batch_size], losses)
                step += 1
                if step % every == 0 or step == total:
                    self._validate(cells, epoch, step, losses)
                    losses = {cell.name: [] for cell in cells}
                    if ft.patience and all(cell.stale >= int(ft.patience) for cell in cells):
                        total = step  # every cell has stopped improving
                if step >= total:
                    break
            epoch += 1
        for cell in cells:
            cell.model.load_state_dict(cell.best_state)
        return cells

    def _train_step(self, cells: list[ProbeCell], chunk, losses: dict) -> None:
        targets, extra = self.labels[chunk].to(self.device), self.ehr[chunk].to(self.device)
        for _, group in itertools.groupby(cells, key=lambda c: c.features_name):
            group = list(group)
            maps, present = self.features.batch(group[0].selection, chunk, self.device)
            for cell in group:
                cell.model.train()
                loss = masked_bce_loss(cell.model(maps, present, extra), targets, self.pos_weight)
                cell.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                cell.optimizer.step()
                losses[cell.name].append(loss.item())

    def _validate(self, cells: list[ProbeCell], epoch: int, step: int, losses: dict) -> None:
        studies = self.studies
        for cell in cells:
            probs = predict_probes(cell.model, self.features, cell.selection, self.ehr, self.val_idx,
                                   self.batch_size, self.device)
            frame = studies.frame.iloc[self.val_idx].assign(**_prob_columns(studies.label_names, probs))
            _, macro, _ = auroc_scores(patient_level(frame, studies.label_names), studies.label_names, "val")
            val_loss = float(masked_bce_loss(torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)),
                                             self.labels[self.val_idx]))
            # Validation AUROC chooses; when no label has both classes in val, the loss does.
            score = macro if macro is not None else -val_loss
            if score > cell.best_score:
                cell.best_score, cell.best_epoch, cell.best_step, cell.best_val_auroc = score, epoch, step, macro
                cell.best_state = copy.deepcopy(cell.model.state_dict())
                cell.stale = 0
            else:
                cell.stale += 1
            self.log.write(
                cell=cell.name,
                stage=cell.stage,
                epoch=epoch,
                step=step,
                train_loss=float(np.mean(losses[cell.name])) if losses[cell.name] else None,
                val_loss=val_loss,
                val_macro_auroc=macro,
            )


def _plain_score(score: float) -> float | None:
    return None if not np.isfinite(score) else float(score)


def predict_probes(model, features: CachedFeatures, selection: dict, ehr: torch.Tensor, indices, batch_size: int,
                   device) -> np.ndarray:
    """Sigmoid probabilities (n, L) for the studies at ``indices``."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            maps, present = features.batch(selection, chunk, device)
            out.append(torch.sigmoid(model(maps, present, ehr[chunk].to(device))).float().cpu())
    if not out:
        return np.zeros((0, len(model.labels)), dtype=np.float32)
    return torch.cat(out).numpy()


def _prob_columns(labels, probs: np.ndarray) -> dict:
    return {f"prob_{name}": probs[:, i] for i, name in enumerate(labels)}
