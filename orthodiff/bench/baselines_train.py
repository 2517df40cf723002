"""Train a supervised baseline (``resnet3d``, ``mrnet2d``) on a fine-tuning run's splits and inputs,
and write the fine-tuning run directory contract, so ``orthodiff evaluate`` scores it exactly as it
scores orthodiff's runs.

Same patients (``run_patients``: the nested label-fraction subset, val, test), same plane tensors
(``StudyDataset``), same augmentation as orthodiff's end-to-end fine-tuning, same loss (masked BCE),
same model selection (best validation macro AUROC over patients), same prediction columns.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from ..config import save_config
from ..errors import OrthodiffError
from ..fileio import write_json, write_table
from ..planes import PLANES

PREDICTION_COLUMNS = ("study_id", "patient_id", "split", "site", "field_strength")


def train_baseline(cfg, name: str, run_dir: Path, options: dict, epochs: int, learning_rate: float,
                   batch_size: int) -> dict:
    """Train baseline ``name`` with ``cfg``'s data, splits, labels fraction and seed; write ``run_dir``.

    Returns the run.json contents.
    """
    import torch

    from ..baselines import build_baseline
    from ..data.cache import PlaneCache
    from ..data.splits import load_splits
    from ..finetune.scoring import MetricsLog, auroc_scores, patient_level
    from ..finetune.studies import resolve_labels, run_patients
    from ..heads import masked_bce_loss

    if int(epochs) < 1:
        raise OrthodiffError(f"baseline_epochs={epochs}: must be at least 1")
    start = time.perf_counter()
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = PlaneCache(cfg.data.cache)
    cache.check_plane_size(cfg.data.plane_size)
    splits = load_splits(cfg.data.splits)
    cache.check_splits(splits)
    fraction = float(cfg.finetune.labels_fraction)
    patients = run_patients(splits, fraction)
    labels = resolve_labels(cache, cfg.data.labels, f"data.labels (cache {cache.root})")
    planes = [p for p in PLANES if (cache.index["plane"] == p).any()]
    datasets = _datasets(cache, patients, labels, planes, cfg)
    save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl")

    model = build_baseline(name, labels, {p: cache.plane_size[p] for p in planes}, planes=planes, **options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(learning_rate),
                                  weight_decay=float(cfg.finetune.weight_decay))
    # a last batch of one study would leave batch norm one value per channel; drop it (reshuffled each epoch)
    loader = _loader(datasets["train"], batch_size, shuffle=True, seed=seed,
                     drop_last=len(datasets["train"]) > int(batch_size))
    best = {"score": -np.inf, "epoch": -1, "state": None, "val_macro_auroc": None}
    for epoch in range(int(epochs)):
        model.train()
        losses = []
        for batch in loader:
            batch = _to(batch, device)
            loss = masked_bce_loss(model(batch).float(), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.finetune.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.finetune.max_grad_norm))
            optimizer.step()
            losses.append(loss.item())
        frame = predict(model, datasets["val"], "val", labels, batch_size, device)
        _, macro, _ = auroc_scores(patient_level(frame, labels), labels, "val")
        score = macro if macro is not None else -epoch  # no defined AUROC: keep the latest epoch
        if score > best["score"]:
            best.update(score=score, epoch=epoch, val_macro_auroc=macro, state=copy.deepcopy(model.state_dict()))
        log.write(epoch=epoch, train_loss=float(np.mean(losses)) if losses else None, val_macro_auroc=macro)
    model.load_state_dict(best["state"])

    import pandas as pd

    frame = pd.concat([predict(model, datasets[s], s, labels, batch_size, device) for s in ("val", "test")],
                      ignore_index=True)
    columns = list(PREDICTION_COLUMNS) + [f"prob_{n}" for n in labels] + [f"label_{n}" for n in labels]
    write_table(run_dir / "predictions.csv", frame[columns])
    per_patient = patient_level(frame, labels)
    metrics = {}
    for split in ("val", "test"):
        scores, macro, _ = auroc_scores(per_patient, labels, split)
        metrics[split] = {"macro_auroc": macro, "auroc": scores, "level": "patient"}
    info = {
        "task": "classify", "labels": labels, "classes": [],
        "cache": str(Path(cfg.data.cache).resolve()), "splits": str(Path(cfg.data.splits).resolve()),
        "labels_fraction": fraction, "init": "scratch", "mode": "supervised", "baseline": name,
        "baseline_options": options, "seed": seed, "epochs": int(epochs), "learning_rate": float(learning_rate),
        "batch_size": int(batch_size), "augment": bool(cfg.finetune.augment), "best_epoch": best["epoch"],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "patients": {split: len(ids) for split, ids in patients.items()},
        "metrics": metrics, "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(run_dir / "run.json", info)
    return info


def _datasets(cache, patients: dict, labels: list, planes: list, cfg) -> dict:
    from ..data.datasets import StudyDataset
    from ..finetune.augment import make_study_augment

    augment = make_study_augment() if cfg.finetune.augment else None
    common = {"labels": labels, "planes": planes, "ehr_columns": cfg.data.ehr_columns}
    train = StudyDataset(cache, patients["train"], augment=augment, **common)
    if len(train) == 0:
        raise OrthodiffError(f"{cfg.data.splits}: the training subset has no study with prepared planes")
    datasets = {"train": train}
    for split in ("val", "test"):
        datasets[split] = StudyDataset(cache, patients[split], ehr_stats=train.ehr_stats, **common)
    return datasets


def _loader(dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
    import torch
    from torch.utils.data import DataLoader

    from ..data.datasets import collate_studies

    return DataLoader(dataset, batch_size=max(1, int(batch_size)), shuffle=shuffle, collate_fn=collate_studies,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(int(seed)))


def _to(batch: dict, device) -> dict:
    moved = dict(batch)
    moved["images"] = {plane: value.to(device) for plane, value in batch["images"].items()}
    for key in ("present", "labels"):
        moved[key] = batch[key].to(device)
    return moved


def predict(model, dataset, split: str, labels: list, batch_size: int, device):
    """Study rows of predictions.csv for one split."""
    import pandas as pd
    import torch

    model.eval()
    rows = []
    with torch.no_grad():
        for batch in _loader(dataset, batch_size, shuffle=False, seed=0):
            batch = _to(batch, device)
            probs = torch.sigmoid(model(batch).float()).cpu().numpy()
            for i, study_id in enumerate(batch["study_id"]):
                row = {"study_id": study_id, "patient_id": batch["patient_id"][i], "split": split,
                       "site": batch["meta"]["site"][i], "field_strength": float(batch["meta"]["field_strength"][i])}
                row.update({f"prob_{n}": float(probs[i, j]) for j, n in enumerate(labels)})
                row.update({f"label_{n}": float(batch["labels"][i, j]) for j, n in enumerate(labels)})
                rows.append(row)
    return pd.DataFrame(rows)
