"""Train a supervised baseline (``resnet3d``, ``mrnet2d``) on a fine-tuning run's splits and inputs,
and write the fine-tuning run directory contract, so ``orthodiff evaluate`` scores it exactly as it
scores orthodiff's runs.

Same patients (``run_patients``: the nested label-fraction subset, val, test), same plane tensors
(``StudyDataset``), same augmentation as orthodiff's end-to-end fine-tuning, same loss (masked BCE),
same model selection (best validation macro AUROC over patients), same prediction columns, same
step budget (``finetune.max_steps``, ``eval_every``, ``patience``; epochs when unset).

``train_segmentation_baseline`` does the same for segmentation (``dynunet``, the supervised
reference): same datasets and augmentation, class-balanced Dice + CE, best validation mean Dice,
the segmentation contract (``segmentations/index.csv``).

On several processes (``accelerate launch``, ``torchrun``) both train data parallel as orthodiff's
end-to-end fine-tuning does: every process takes every step, the main process alone validates (its
score decides best weights and early stopping for all) and writes the run directory, and every
process returns its run.json record.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from ...config import save_config
from ...errors import OrthodiffError
from ...fileio import write_json, write_table
from ...planes import PLANES

PREDICTION_COLUMNS = ("study_id", "patient_id", "split", "site", "field_strength")


def _open_run(cfg, run_dir) -> tuple:
    """Seed everything and check the cache against the config and the splits file.

    Returns (seed, run_dir, cache, patients of the run's label fraction).
    """
    import torch

    from ...data.cache import PlaneCache
    from ...data.splits import load_splits
    from ...finetune.studies import run_patients

    seed = int(cfg.seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    run_dir = Path(run_dir)
    cache = PlaneCache(cfg.data.cache)
    cache.check_plane_size(cfg.data.plane_size)
    splits = load_splits(cfg.data.splits)
    cache.check_splits(splits)
    return seed, run_dir, cache, run_patients(splits, float(cfg.finetune.labels_fraction))


def _start_run_directory(cfg, run_dir: Path, main: bool):
    """The main process saves the config and opens the metrics log; the others log nowhere."""
    from ...finetune.scoring import MetricsLog
    from ...finetune.steps import SilentLog

    if not main:
        return SilentLog()
    save_config(cfg, run_dir / "config.yaml")
    return MetricsLog(run_dir / "metrics.jsonl")


def _finish_run(state, run_dir: Path, info: dict | None) -> dict:
    """The main process writes run.json from ``info``; every process returns that record."""
    if state.is_main_process:
        write_json(run_dir / "run.json", info)
    if state.num_processes == 1:
        return info
    from accelerate.utils import broadcast_object_list

    shared = [info]
    broadcast_object_list(shared, from_process=0)  # also waits until run.json is written
    return shared[0]


def train_baseline(cfg, name: str, run_dir: Path, options: dict, epochs: int, learning_rate: float,
                   batch_size: int) -> dict:
    """Train baseline ``name`` with ``cfg``'s data, splits, labels fraction and seed; write ``run_dir``.

    Returns the run.json contents.
    """
    import torch

    from ...baselines import build_baseline
    from ...finetune.endtoend import distributed_loss, make_accelerator, validate_on_main
    from ...finetune.scoring import auroc_scores, patient_level
    from ...finetune.steps import StepBudget, run_summary, train_best
    from ...finetune.studies import resolve_labels
    from ...heads import masked_bce_loss

    if int(epochs) < 1:
        raise OrthodiffError(f"baseline_epochs={epochs}: must be at least 1")
    start = time.perf_counter()
    seed, run_dir, cache, patients = _open_run(cfg, run_dir)
    labels = resolve_labels(cache, cfg.data.labels, f"data.labels (cache {cache.root})")
    planes = [p for p in PLANES if (cache.index["plane"] == p).any()]
    datasets = _datasets(cache, patients, labels, planes, cfg)
    # fine-tuning's precision: Accelerate keeps one per process, and a bench fine-tunes and trains baselines in one
    accelerator = make_accelerator(cfg)
    log = _start_run_directory(cfg, run_dir, accelerator.is_main_process)

    model = build_baseline(name, labels, {p: cache.plane_size[p] for p in planes}, planes=planes, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(learning_rate),
                                  weight_decay=float(cfg.finetune.weight_decay))
    # a last batch of one study would leave batch norm one value per channel; drop it (reshuffled each epoch)
    loader = _loader(datasets["train"], batch_size, shuffle=True, seed=seed,
                     drop_last=len(datasets["train"]) > int(batch_size))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device

    def step(batch):
        model.train()
        batch = _to(batch, device)
        loss = masked_bce_loss(model(batch).float(), batch["labels"])
        value = loss.item()
        if accelerator.num_processes > 1:  # every process backpropagates through every parameter
            loss, value = distributed_loss(accelerator, model, loss)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.finetune.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), float(cfg.finetune.max_grad_norm))
        optimizer.step()
        return value

    def validate():
        frame = predict(unwrapped, datasets["val"], "val", labels, batch_size, device)
        return auroc_scores(patient_level(frame, labels), labels, "val")[1]

    # the same budget as orthodiff's fine-tuning: epochs, or finetune.max_steps optimizer steps
    budget = StepBudget.from_finetune(cfg.finetune, epochs=int(epochs))
    best = train_best(budget, loader, step, lambda: validate_on_main(accelerator, validate),
                      lambda: copy.deepcopy(unwrapped.state_dict()), log, "val_macro_auroc")
    # what is written runs outside Accelerate: without its autocast wrapper
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.load_state_dict(best.pop("state"))
    if not accelerator.is_main_process:
        return _finish_run(accelerator, run_dir, None)

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
        "labels_fraction": float(cfg.finetune.labels_fraction), "init": "scratch", "mode": "supervised", "baseline": name,
        "baseline_options": options, "seed": seed, "epochs": int(epochs), "learning_rate": float(learning_rate),
        "batch_size": int(batch_size), "augment": bool(cfg.finetune.augment), **run_summary(best),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "patients": {split: len(ids) for split, ids in patients.items()},
        "metrics": metrics, "seconds": round(time.perf_counter() - start, 2),
    }
    return _finish_run(accelerator, run_dir, info)


def _datasets(cache, patients: dict, labels: list, planes: list, cfg) -> dict:
    from ...data.datasets import StudyDataset
    from ...finetune.augment import make_study_augment

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

    from ...data.datasets import collate_studies

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


SEGMENTATION_BASELINES = ("dynunet",)


def train_segmentation_baseline(cfg, name: str, run_dir: Path, options: dict | None = None) -> dict:
    """Train segmentation baseline ``name`` (``dynunet``) from scratch with ``cfg``'s data, splits,
    labels fraction, seed, augmentation, loss and step budget (``finetune.epochs`` or
    ``finetune.max_steps``, ``eval_every``, ``patience``, ``batch_size``); write the segmentation
    run-directory contract to ``run_dir`` so ``orthodiff evaluate`` scores it. Returns run.json.

    ``options``: ``optimizer`` (adamw, or sgd: nnU-Net's SGD with Nesterov momentum 0.99),
    ``learning_rate`` (default finetune.learning_rate for adamw, 0.01 for sgd), ``base_filters``,
    ``max_filters``, ``deep_supervision``, ``deep_supr_num``. The learning rate decays by nnU-Net's poly
    schedule over the step budget.
    """
    import json

    import torch
    from accelerate import PartialState

    from ...baselines.dynunet import DynUNetSegmenter, deep_supervision_weights, poly_factor
    from ...finetune.endtoend import (
        fit_best,
        mean_dice,
        predict_segmenter,
        segmentation_loss,
        training_class_counts,
    )
    from ...finetune.run import _study_datasets, resolve_classes, write_segmentations
    from ...finetune.steps import run_summary
    from ...heads.segmentation import class_weights, make_dice_ce_loss

    if name not in SEGMENTATION_BASELINES:
        raise OrthodiffError(f"segmentation baseline {name!r} is unknown; use one of {', '.join(SEGMENTATION_BASELINES)}")
    options = dict(options or {})
    optimizer_name = str(options.pop("optimizer", "adamw")).lower()
    if optimizer_name not in ("adamw", "sgd"):
        raise OrthodiffError(f"dynunet optimizer={optimizer_name!r}: use adamw or sgd")
    learning_rate = float(options.pop("learning_rate", 1e-2 if optimizer_name == "sgd" else cfg.finetune.learning_rate))
    start = time.perf_counter()
    seed, run_dir, cache, patients = _open_run(cfg, run_dir)
    classes = resolve_classes(cfg, cache)
    planes = [p for p in PLANES if (cache.index["plane"] == p).any()]
    datasets = _study_datasets(cache, patients, [], planes, cfg, with_segmentation=True)
    if len(datasets["train"]) == 0:
        raise OrthodiffError(f"{cfg.data.splits}: the training subset has no study with prepared planes")
    state = PartialState()
    log = _start_run_directory(cfg, run_dir, state.is_main_process)

    spacing = {plane: np.median(np.array([json.loads(v) for v in cache.index.loc[cache.index["plane"] == plane,
                                                                                    "tensor_spacing"]]), axis=0)
               for plane in planes}
    try:
        model = DynUNetSegmenter({p: cache.plane_size[p] for p in planes}, spacing, len(classes), planes=planes,
                                 **options)
    except TypeError as exc:  # an option the model does not take
        raise OrthodiffError(f"segmentation baseline {name!r}: {exc}") from exc
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.99, nesterov=True,
                                    weight_decay=3e-5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                      weight_decay=float(cfg.finetune.weight_decay))
    weights = class_weights(training_class_counts(datasets["train"], len(classes))) if cfg.finetune.class_balance \
        else None
    loss_fn = make_dice_ce_loss(weights)

    def loss_of(model, batch):
        loss_fn.to(batch["seg_present"].device)
        total, terms = 0.0, 0
        for plane, output in model(batch).items():
            heads = output.unbind(1) if output.dim() == 6 else (output,)  # deep supervision: stacked outputs
            losses = [segmentation_loss({plane: head}, batch, [plane], loss_fn) for head in heads]
            if losses[0] is None:  # no study of the batch has this plane's segmentation
                continue
            total = total + sum(w * loss for w, loss in zip(deep_supervision_weights(len(heads) - 1), losses))
            terms += 1
        return total / terms if terms else None

    def validate(model, device):
        return mean_dice(predict_segmenter(model, datasets["val"], cfg, device), len(classes))

    model, summary = fit_best(cfg, model, datasets["train"], loss_of, validate, log, "val_mean_dice",
                              optimizer=optimizer, schedule=poly_factor)
    if not state.is_main_process:
        return _finish_run(state, run_dir, None)
    metrics, warnings = write_segmentations(cfg, cache, model, datasets, len(classes), run_dir)
    info = {
        "task": "segment", "labels": [], "classes": classes,
        "cache": str(Path(cfg.data.cache).resolve()), "splits": str(Path(cfg.data.splits).resolve()),
        "labels_fraction": float(cfg.finetune.labels_fraction), "init": "scratch", "mode": "supervised",
        "baseline": name, "baseline_options": options, "optimizer": optimizer_name, "learning_rate": learning_rate,
        "lr_schedule": "poly 0.9", "seed": seed, "epochs": int(cfg.finetune.epochs),
        "max_steps": cfg.finetune.max_steps, "batch_size": int(cfg.finetune.batch_size),
        "augment": bool(cfg.finetune.augment), "class_weights": None if weights is None else
        [round(float(w), 4) for w in weights], "plans": model.plans, **run_summary(summary),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "patients": {split: len(ids) for split, ids in patients.items()},
        "metrics": metrics, "warnings": warnings, "seconds": round(time.perf_counter() - start, 2),
    }
    return _finish_run(state, run_dir, info)
