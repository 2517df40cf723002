"""Probes on cached, frozen features: one head (``probe``) or a grid of heads trained in one pass
over the same batches (``grid``: learning rate x block x timestep, as dinov2's linear evaluation).

Augmentation does not apply here: the features were computed once from the unaugmented tensors.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import OrthodiffError
from ..features.extractor import timestep_spec_name, timestep_specs
from ..heads import MultiLabelClassifier, masked_bce_loss, positive_weights
from ..planes import PLANES
from .scoring import MetricsLog, auroc_scores, patient_level
from .studies import RunStudies


class CachedFeatures:
    """One (block, timestep) of the store for the run's studies, held in memory as float16.

    A plane the study lacks (or the store lacks) is zeros with ``present`` False.
    """

    def __init__(self, store, studies: RunStudies, block: str, spec: str):
        self.key = (block, spec)
        self.planes = store.planes
        count = len(studies.frame)
        self.present = np.zeros((count, len(PLANES)), dtype=bool)
        self.maps: dict[str, torch.Tensor] = {}
        for plane in self.planes:
            rows = store.rows(plane)
            row_of = dict(zip(rows["study_id"], rows["row"]))
            wanted = [row_of.get(study_id, -1) for study_id in studies.frame["study_id"]]
            array = store.array(plane, block, spec)
            maps = torch.zeros((count, *array.shape[1:]), dtype=torch.float16)
            have = [i for i, row in enumerate(wanted) if row >= 0]
            if have:
                maps[have] = torch.from_numpy(np.asarray(array[[wanted[i] for i in have]], dtype=np.float16))
            self.maps[plane] = maps
            self.present[have, PLANES.index(plane)] = True

    def channels(self) -> dict[str, int]:
        return {plane: int(self.maps[plane].shape[1]) for plane in self.planes}

    def batch(self, indices, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        maps = {plane: self.maps[plane][index].to(device, torch.float32) for plane in self.planes}
        return maps, torch.from_numpy(self.present[np.asarray(indices)]).to(device)


@dataclass
class ProbeCell:
    """One head of a grid: its features, learning rate, model and the best state seen on validation."""

    block: str
    timestep: str
    learning_rate: float
    model: MultiLabelClassifier
    optimizer: torch.optim.Optimizer
    best_score: float = -np.inf
    best_epoch: int = -1
    best_val_auroc: float | None = None
    best_state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.block}@t{self.timestep}/lr{self.learning_rate:g}"

    def describe(self) -> dict:
        return {
            "block": self.block,
            "timestep": self.timestep,
            "learning_rate": self.learning_rate,
            "best_epoch": self.best_epoch,
            "val_macro_auroc": self.best_val_auroc,
        }


def probe_keys(cfg, grid: bool) -> list[tuple[str, str]]:
    """(block, timestep spec) pairs: the first of ``features.*`` for a probe, all of them for a grid."""
    specs = [timestep_spec_name(s) for s in timestep_specs(cfg.features.timesteps, cfg.features.average_timesteps)]
    blocks = list(cfg.features.blocks)
    if not grid:
        return [(blocks[0], specs[0])]
    return [(block, spec) for block in blocks for spec in specs]


def train_probes(cfg, store, studies: RunStudies, log: MetricsLog, grid: bool) -> tuple[ProbeCell, list[ProbeCell], dict]:
    """Train every cell for ``finetune.epochs`` over the same shuffled batches; each keeps its best
    validation epoch. Returns (best cell, all cells, {key: CachedFeatures})."""
    ft = cfg.finetune
    keys = probe_keys(cfg, grid)
    store.require(keys)
    rates = [float(r) for r in (ft.grid_learning_rates if grid else [ft.learning_rate])]
    if not rates:
        raise OrthodiffError("finetune.grid_learning_rates is empty; give at least one learning rate")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features = {key: CachedFeatures(store, studies, *key) for key in keys}
    train_idx, val_idx = studies.where("train"), studies.where("val")
    if len(train_idx) == 0:
        raise OrthodiffError("the training subset has no study with prepared planes; check the cache and splits")
    labels = torch.from_numpy(studies.labels)
    ehr = torch.from_numpy(studies.ehr)
    pos_weight = positive_weights(labels[train_idx]).to(device) if ft.pos_weight else None

    torch.manual_seed(int(cfg.seed))
    cells = []
    for (block, spec), rate in itertools.product(keys, rates):
        model = MultiLabelClassifier(
            features[(block, spec)].channels(),
            studies.label_names,
            pooling=ft.pooling,
            fusion=ft.fusion,
            num_ehr=ehr.shape[1],
            use_ehr=ft.use_ehr,
        ).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=float(ft.weight_decay))
        cells.append(ProbeCell(block, spec, rate, model, optimizer))

    generator = torch.Generator().manual_seed(int(cfg.seed))
    batch_size = max(1, int(ft.batch_size))
    for epoch in range(int(ft.epochs)):
        order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        losses = {cell.name: [] for cell in cells}
        for cell in cells:
            cell.model.train()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            targets, extra = labels[chunk].to(device), ehr[chunk].to(device)
            for key, group in itertools.groupby(cells, key=lambda c: (c.block, c.timestep)):
                maps, present = features[key].batch(chunk, device)
                for cell in group:
                    loss = masked_bce_loss(cell.model(maps, present, extra), targets, pos_weight)
                    cell.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    cell.optimizer.step()
                    losses[cell.name].append(loss.item())
        for cell in cells:
            probs = predict_probes(cell.model, features[(cell.block, cell.timestep)], ehr, val_idx, batch_size, device)
            frame = studies.frame.iloc[val_idx].assign(**_prob_columns(studies.label_names, probs))
            _, macro, _ = auroc_scores(patient_level(frame, studies.label_names), studies.label_names, "val")
            val_loss = float(masked_bce_loss(torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)), labels[val_idx]))
            # Validation AUROC chooses; when no label has both classes in val, the loss does.
            score = macro if macro is not None else -val_loss
            if score > cell.best_score:
                cell.best_score, cell.best_epoch, cell.best_val_auroc = score, epoch, macro
                cell.best_state = copy.deepcopy(cell.model.state_dict())
            log.write(
                cell=cell.name,
                epoch=epoch,
                train_loss=float(np.mean(losses[cell.name])) if losses[cell.name] else None,
                val_loss=val_loss,
                val_macro_auroc=macro,
            )
    for cell in cells:
        cell.model.load_state_dict(cell.best_state)
    best = max(cells, key=lambda c: c.best_score)  # first of equals: the grid's order breaks ties
    return best, cells, features


def predict_probes(model, features: CachedFeatures, ehr: torch.Tensor, indices, batch_size: int, device) -> np.ndarray:
    """Sigmoid probabilities (n, L) for the studies at ``indices``."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            maps, present = features.batch(chunk, device)
            out.append(torch.sigmoid(model(maps, present, ehr[chunk].to(device))).float().cpu())
    if not out:
        return np.zeros((0, len(model.labels)), dtype=np.float32)
    return torch.cat(out).numpy()


def _prob_columns(labels, probs: np.ndarray) -> dict:
    return {f"prob_{name}": probs[:, i] for i, name in enumerate(labels)}
