"""Training through the denoisers: classify in ``partial``/``full`` mode, segment in every mode.

Features are computed on the fly from (augmented) plane tensors with the same seeded noise as the
feature store. ``probe``: denoisers frozen (segmentation only); ``partial``: time embedding, input
convolution, encoder and middle block train at ``learning_rate * encoder_lr_scale``, the decoder is
frozen (and not run when only encoder/middle blocks are read); ``full``: every denoiser weight
that the read blocks depend on trains at that rate. Blocks past the deepest one read never run, so
they stay frozen in every mode: on several processes DDP would otherwise wait for their gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import OrthodiffError
from ..features.extractor import FeatureExtractor
from ..heads import (
    MultiLabelClassifier,
    SegmentationModel,
    masked_bce_loss,
    positive_weights,
)
from ..heads.segmentation import PixelSegmenter, class_weights, make_dice_ce_loss
from ..planes import PLANES
from .scoring import MetricsLog, auroc_scores, dice_per_class, patient_level

ENCODER_PARTS = ("time_embed", "conv_in", "down_blocks", "middle_block")


class Backbone(nn.Module):
    """The planes' denoisers read at one timestep: {plane: {block: (B, C, d, h, w)}}; given a list of
    timesteps, every block at every one: {plane: {"<block>@<t>": ...}}."""

    def __init__(self, denoisers: dict, timestep, blocks: list[str], seed: int, mode: str):
        super().__init__()
        self.denoisers = nn.ModuleDict(denoisers)
        self.by_timestep = isinstance(timestep, (list, tuple))
        timesteps = [int(t) for t in timestep] if self.by_timestep else [int(timestep)]
        self.extractors = {
            plane: FeatureExtractor(denoiser, timesteps, blocks, seed=seed) for plane, denoiser in denoisers.items()
        }
        self.mode = mode
        set_trainable(self.denoisers, mode, blocks)

    def forward(self, images: dict, study_ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "probe"):
            for plane, extractor in self.extractors.items():
                found = extractor(images[plane], study_ids)
                out[plane] = {pixel_key(block, t) if self.by_timestep else block: value
                              for (block, t), value in found.items()}
        return out


def pixel_key(block: str, timestep) -> str:
    return f"{block}@{timestep}"


def set_trainable(denoisers: nn.ModuleDict, mode: str, blocks: list[str]) -> None:
    """``full``: train what the read ``blocks`` depend on; ``partial``: only its encoder part; ``probe``: nothing."""
    for denoiser in denoisers.values():
        deepest = max(blocks, key=denoiser.block_names().index)
        for name, parameter in denoiser.unet.named_parameters():
            trains = mode in ("full", "partial") and runs_before(name, deepest)
            if mode == "partial":
                trains = trains and name.split(".")[0] in ENCODER_PARTS
            parameter.requires_grad_(trains)


def runs_before(parameter: str, deepest: str) -> bool:
    """Whether the UNet parameter named ``parameter`` is used on the way to block ``deepest``'s output
    (``Denoiser.features`` stops there; the output layer is never read)."""
    part, _, rest = parameter.partition(".")
    index = int(rest.split(".")[0]) if part in ("down_blocks", "up_blocks") else None
    if part in ("time_embed", "conv_in"):
        return True
    if part == "down_blocks":
        return not deepest.startswith("down") or index <= int(deepest[4:])
    if part == "middle_block":
        return not deepest.startswith("down")
    if part == "up_blocks":
        return deepest.startswith("up") and index <= int(deepest[2:])
    return False


class EndToEndClassifier(nn.Module):
    def __init__(self, backbone: Backbone, head: MultiLabelClassifier, block: str):
        super().__init__()
        self.backbone, self.head, self.block = backbone, head, block

    def forward(self, batch: dict) -> torch.Tensor:
        features = self.backbone(batch["images"], batch["study_id"])
        maps = {plane: features[plane][self.block] for plane in self.head.planes}
        return self.head(maps, batch["present"], batch["ehr"])


class EndToEndSegmenter(nn.Module):
    def __init__(self, backbone: Backbone, head: SegmentationModel):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(batch["images"], batch["study_id"]), batch["present"], batch["images"])


def parameter_groups(model: nn.Module, cfg) -> list[dict]:
    ft = cfg.finetune
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": float(ft.learning_rate)}]
    if backbone:
        groups.append({"params": backbone, "lr": float(ft.learning_rate) * float(ft.encoder_lr_scale)})
    return groups


def learning_rate_schedule(name: str):
    """``finetune.lr_schedule`` as a factor of (step, total steps), or None for a constant rate."""
    from ..baselines.dynunet import poly_factor

    schedules = {"constant": None, "poly": poly_factor}
    if name not in schedules:
        raise OrthodiffError(f"finetune.lr_schedule={name!r}: use constant or poly")
    return schedules[name]


def use_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 5-D weights in channels-last order: 3D convolutions then run on oneDNN's
    channels-last kernels and pass that order on, so the inputs need no conversion."""
    return model.to(memory_format=torch.channels_last_3d)


def make_accelerator(cfg):
    from accelerate import Accelerator

    from ..training.precision import choose_mixed_precision

    precision = choose_mixed_precision(cfg.finetune.mixed_precision, "finetune.mixed_precision")
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int):
    from torch.utils.data import DataLoader

    from ..data.datasets import collate_studies

    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset, batch_size=max(1, batch_size), shuffle=shuffle, collate_fn=collate_studies,
        generator=generator, num_workers=int(workers),
    )


def _to(batch: dict, device) -> dict:
    moved = dict(batch)
    moved["images"] = {plane: value.to(device) for plane, value in batch["images"].items()}
    for key in ("present", "labels", "ehr", "seg_present"):
        if key in batch:
            moved[key] = batch[key].to(device)
    if "segs" in batch:
        moved["segs"] = {plane: value.to(device) for plane, value in batch["segs"].items()}
    return moved


def fit_best(cfg, model: nn.Module, train_set, loss_of, validate, log: MetricsLog, metric: str,
             optimizer=None, schedule=None):
    """Train ``model`` through Accelerate for ``finetune``'s budget (epochs, or ``max_steps`` optimizer
    steps) and keep its best validation (``steps.train_best``).

    ``loss_of(model, batch)`` gives the batch loss (None: nothing to learn from, skipped);
    ``validate(model, device)`` gives the validation score (None when undefined). ``optimizer``
    defaults to AdamW over ``parameter_groups``; ``schedule(step, total)`` multiplies every group's
    learning rate (default: ``finetune.lr_schedule``'s). Returns (model with the best weights loaded, summary:
    best_epoch, best_step, steps, stopped_early and ``metric``).

    On several processes every rank takes every step (``distributed_loss``), the main process alone
    validates and writes ``log``, and the score it finds steers every rank, so they keep and stop alike.
    """
    from .steps import SilentLog, StepBudget, train_best

    ft = cfg.finetune
    budget = StepBudget.from_finetune(ft)
    if schedule is None:
        schedule = learning_rate_schedule(ft.lr_schedule)
    accelerator = make_accelerator(cfg)
    if ft.channels_last:
        model = use_channels_last(model)
    if optimizer is None:
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg), weight_decay=float(ft.weight_decay))
    train_loader = _loader(train_set, ft.batch_size, True, cfg.seed, cfg.data.num_workers)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    total = budget.max_steps or budget.epochs * max(1, len(train_loader))
    base_rates = [group["lr"] for group in optimizer.param_groups]
    counter = {"steps": 0}

    def step(batch):
        model.train()
        batch = _to(batch, accelerator.device)
        with accelerator.autocast():
            loss = loss_of(model, batch)
        if accelerator.num_processes > 1:
            loss, value = distributed_loss(accelerator, model, loss)
        else:
            value = None if loss is None else loss.item()
        if loss is None:
            return None
        if schedule is not None:
            factor = float(schedule(counter["steps"], total))
            for group, rate in zip(optimizer.param_groups, base_rates):
                group["lr"] = rate * factor
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if ft.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), float(ft.max_grad_norm))
        optimizer.step()
        counter["steps"] += 1
        return value

    unwrapped = accelerator.unwrap_model(model)
    summary = train_best(
        budget, train_loader, step,
        validate=lambda: validate_on_main(accelerator, lambda: validate(unwrapped, accelerator.device)),
        snapshot=lambda: copy.deepcopy(unwrapped.state_dict()),
        log=log if accelerator.is_main_process else SilentLog(), metric=metric,
    )
    # what is exported and thresholded runs outside Accelerate: without its autocast wrapper
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.load_state_dict(summary.pop("state"))
    return model, summary


def distributed_loss(accelerator, model: nn.Module, loss):
    """(loss every rank backpropagates, mean loss over the ranks that had one), or (None, None) when no
    rank has anything to learn from this step.

    DDP all-reduces each parameter's gradient once per backward and waits for it on every rank, so
    every rank runs the same backward: a rank without a loss (a batch with no segmentation) and
    parameters its loss does not reach (a plane missing from its batch) take part through a zero term
    over every trainable parameter.
    """
    own = torch.zeros(2, device=accelerator.device)
    if loss is not None:
        own[0], own[1] = 1.0, loss.detach().float()
    ranks_with_loss, summed = accelerator.reduce(own, reduction="sum").tolist()
    if ranks_with_loss == 0:
        return None, None
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    zero = torch.stack([parameter.sum() for parameter in trainable]).sum() * 0.0
    return (zero if loss is None else loss + zero), summed / ranks_with_loss


def validate_on_main(accelerator, validate):
    """``validate()`` on the main process, its score given to every process (the others wait)."""
    if accelerator.num_processes == 1:
        return validate()
    from accelerate.utils import broadcast_object_list

    score = [validate() if accelerator.is_main_process else None]
    broadcast_object_list(score, from_process=0)
    return score[0]


# ------------------------------------------------------------------------------- classify
def train_classifier(cfg, denoisers, datasets: dict, labels: list[str], log: MetricsLog):
    """Returns (model with the best validation epoch loaded, {"best_epoch", "val_macro_auroc"})."""
    ft = cfg.finetune
    block, timestep = cfg.features.blocks[0], int(cfg.features.timesteps[0])
    torch.manual_seed(int(cfg.seed))
    backbone = Backbone(denoisers, timestep, [block], cfg.seed, ft.mode)
    channels = {plane: d.feature_channels(block) for plane, d in denoisers.items()}
    num_ehr = len(datasets["train"].ehr_names)
    head = MultiLabelClassifier(channels, labels, ft.pooling, ft.fusion, num_ehr=num_ehr, use_ehr=ft.use_ehr,
                                readout_grid=ft.readout_grid)
    model = EndToEndClassifier(backbone, head, block)
    pos_weight = None
    if ft.pos_weight:
        known = torch.stack([datasets["train"][i]["labels"] for i in range(len(datasets["train"]))])
        pos_weight = positive_weights(known)

    def loss_of(model, batch):
        weight = None if pos_weight is None else pos_weight.to(batch["labels"].device)
        return masked_bce_loss(model(batch).float(), batch["labels"], weight)

    def validate(model, device):
        frame = predict_classifier(model, datasets["val"], "val", labels, cfg, device)
        return auroc_scores(patient_level(frame, labels), labels, "val")[1]

    return fit_best(cfg, model, datasets["train"], loss_of, validate, log, "val_macro_auroc")


def predict_classifier(model, dataset, split: str, labels: list[str], cfg, device):
    """Study rows for predictions.csv: ids, split, site, field strength, prob_ and label_ columns."""
    import pandas as pd

    model.eval()
    rows = []
    loader = _loader(dataset, cfg.finetune.batch_size, False, cfg.seed, cfg.data.num_workers)
    with torch.no_grad():
        for batch in loader:
            batch = _to(batch, device)
            probs = torch.sigmoid(model(batch).float()).cpu().numpy()
            for i, study_id in enumerate(batch["study_id"]):
                row = {
                    "study_id": study_id,
                    "patient_id": batch["patient_id"][i],
                    "split": split,
                    "site": batch["meta"]["site"][i],
                    "field_strength": float(batch["meta"]["field_strength"][i]),
                }
                row.update({f"prob_{n}": float(probs[i, j]) for j, n in enumerate(labels)})
                row.update({f"label_{n}": float(batch["labels"][i, j]) for j, n in enumerate(labels)})
                rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- segment
def segmentation_blocks(denoiser) -> tuple[str, list[str]]:
    """Bottleneck and skip blocks: the middle block and every encoder level."""
    skips = [name for name in denoiser.block_names() if name.startswith("down")]
    return "mid", skips


def train_segmenter(cfg, denoisers, datasets: dict, num_classes: int, log: MetricsLog):
    """Train the ``finetune.segmenter`` head (decoder or pixel) through the denoisers.

    Returns (model with the best validation loaded, summary: best_epoch, best_step, steps,
    stopped_early, val_mean_dice, class_weights and, for pixel, the blocks x timesteps grid and choice).
    """
    ft = cfg.finetune
    if ft.segmenter not in ("decoder", "pixel"):
        raise OrthodiffError(f"finetune.segmenter={ft.segmenter!r}: use decoder or pixel")
    weights = None
    if ft.class_balance:
        weights = class_weights(training_class_counts(datasets["train"], num_classes))
    loss_fn = make_dice_ce_loss(weights)
    if ft.segmenter == "pixel":
        model, summary = _train_pixel(cfg, denoisers, datasets, num_classes, log, loss_fn)
    else:
        any_denoiser = next(iter(denoisers.values()))
        bottleneck, skips = segmentation_blocks(any_denoiser)
        torch.manual_seed(int(cfg.seed))
        backbone = Backbone(denoisers, int(cfg.features.timesteps[0]), [bottleneck, *skips], cfg.seed, ft.mode)
        shapes = {p: {b: d.feature_shape(b) for b in [bottleneck, *skips]} for p, d in denoisers.items()}
        plane_size = {p: tuple(d.plane_size) for p, d in denoisers.items()}
        head = SegmentationModel(shapes, plane_size, bottleneck, skips, num_classes, pooling=ft.pooling,
                                 width=int(ft.decoder_width), image_channels=1,
                                 image_stem=int(ft.decoder_image_stem))
        model, summary = _fit_segmenter(cfg, EndToEndSegmenter(backbone, head), datasets, num_classes, log, loss_fn)
    summary["class_weights"] = None if weights is None else [round(float(w), 4) for w in weights]
    return model, summary


def _fit_segmenter(cfg, model, datasets: dict, num_classes: int, log, loss_fn):
    planes = list(model.head.planes)

    def loss_of(model, batch):
        return segmentation_loss(model(batch), batch, planes, loss_fn.to(batch["seg_present"].device))

    def validate(model, device):
        return mean_dice(predict_segmenter(model, datasets["val"], cfg, device), num_classes)

    return fit_best(cfg, model, datasets["train"], loss_of, validate, log, "val_mean_dice")


def pixel_cells(blocks: list[str], timesteps: list[int], grid: bool) -> list[tuple[list[str], list[int]]]:
    """The (blocks, timesteps) cells tried: all of both, and with ``grid`` also the finer half of the
    blocks and each timestep alone."""
    cells = [(list(blocks), list(timesteps))]
    if grid:
        block_sets = [list(blocks)] + ([list(blocks[len(blocks) // 2:])] if len(blocks) > 1 else [])
        time_sets = [list(timesteps)] + ([[t] for t in timesteps] if len(timesteps) > 1 else [])
        cells = [(b, t) for t in time_sets for b in block_sets]
    return cells


class _CellLog:
    """metrics.jsonl rows of one grid cell, tagged with its index."""

    def __init__(self, log, cell: int):
        self.log, self.cell = log, cell

    def write(self, **record) -> None:
        self.log.write(cell=self.cell, **record)


def _train_pixel(cfg, denoisers, datasets: dict, num_classes: int, log, loss_fn):
    ft = cfg.finetune
    any_denoiser = next(iter(denoisers.values()))
    decoder_blocks = [name for name in any_denoiser.block_names() if name.startswith("up")]
    blocks = [str(b) for b in ft.pixel_blocks] or decoder_blocks
    order = any_denoiser.block_names()
    unknown = [b for b in blocks if b not in order]
    if unknown:
        raise OrthodiffError(f"finetune.pixel_blocks: {unknown[0]!r} is not a block; use some of {', '.join(order)}")
    blocks = sorted(set(blocks), key=order.index)  # coarse to fine
    timesteps = sorted({int(t) for t in ft.pixel_timesteps})
    if not timesteps:
        raise OrthodiffError("finetune.pixel_timesteps is empty; give timesteps such as [50, 150]")
    cells = pixel_cells(blocks, timesteps, bool(ft.pixel_grid))
    tried, best = [], None
    for index, (cell_blocks, cell_timesteps) in enumerate(cells):
        # every cell starts from the same weights; a trained denoiser is the cell's own copy
        shared = ft.mode == "probe" or len(cells) == 1
        own = denoisers if shared else {p: copy.deepcopy(d) for p, d in denoisers.items()}
        torch.manual_seed(int(cfg.seed))
        backbone = Backbone(own, list(cell_timesteps), cell_blocks, cfg.seed, ft.mode)
        channels = {p: {pixel_key(b, t): d.feature_channels(b) for t in cell_timesteps for b in cell_blocks}
                    for p, d in own.items()}
        plane_size = {p: tuple(d.plane_size) for p, d in own.items()}
        head = PixelSegmenter(channels, plane_size, num_classes, hidden=int(ft.pixel_hidden), image_channels=1)
        model, summary = _fit_segmenter(cfg, EndToEndSegmenter(backbone, head), datasets, num_classes,
                                        _CellLog(log, index), loss_fn)
        record = {"blocks": cell_blocks, "timesteps": cell_timesteps, **summary}
        tried.append(record)
        score, best_score = summary["val_mean_dice"], None if best is None else best[1]["val_mean_dice"]
        if best is None or (score is not None and (best_score is None or score > best_score)):
            best = (model, record)
    model, chosen = best
    summary = {key: chosen[key] for key in ("best_epoch", "best_step", "steps", "stopped_early", "val_mean_dice")}
    summary["pixel"] = {"selection": "validation mean Dice (ties: first cell)", "cells": tried,
                        "chosen": {"blocks": chosen["blocks"], "timesteps": chosen["timesteps"]}}
    return model, summary


def training_class_counts(dataset, num_classes: int) -> np.ndarray:
    """Voxel count per class over the training set's segmentations (plane tensors, unaugmented)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for study_id in dataset.study_ids:
        for plane in dataset.planes:
            series_id = dataset.series_of(study_id, plane)
            seg = None if series_id is None else dataset.cache.seg(series_id)
            if seg is not None:
                counts += np.bincount(np.asarray(seg, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return counts


def segmentation_loss(outputs: dict, batch: dict, planes: list[str], loss_fn) -> torch.Tensor | None:
    """Dice + CE summed over planes, on the studies that have that plane's segmentation."""
    total, terms = 0.0, 0
    for plane in planes:
        have = batch["seg_present"][:, PLANES.index(plane)]
        if not bool(have.any()):
            continue
        logits = outputs[plane][have].float()
        target = batch["segs"][plane][have].unsqueeze(1)
        total = total + loss_fn(logits, target)
        terms += 1
    return total / terms if terms else None


def predict_segmenter(model, dataset, cfg, device):
    """Yields (study_id, patient_id, plane, meta, pred uint8 (D,H,W), target uint8 (D,H,W)) for every
    plane of every study that has a segmentation."""
    model.eval()
    loader = _loader(dataset, cfg.finetune.batch_size, False, cfg.seed, cfg.data.num_workers)
    results = []
    with torch.no_grad():
        for batch in loader:
            batch = _to(batch, device)
            outputs = model(batch)
            for plane, logits in outputs.items():
                column = PLANES.index(plane)
                labels = logits.float().argmax(1).to(torch.uint8).cpu().numpy()
                for i, study_id in enumerate(batch["study_id"]):
                    if not bool(batch["seg_present"][i, column]):
                        continue
                    results.append(
                        {
                            "study_id": study_id,
                            "patient_id": batch["patient_id"][i],
                            "plane": plane,
                            "site": batch["meta"]["site"][i],
                            "field_strength": float(batch["meta"]["field_strength"][i]),
                            "pred": labels[i],
                            "target": batch["segs"][plane][i].cpu().numpy().astype(np.uint8),
                        }
                    )
    return results


def mean_dice(results: list[dict], num_classes: int) -> float | None:
    """Mean over structures of the mean Dice over volumes (structures absent from both are skipped)."""
    per_class: list[list[float]] = [[] for _ in range(1, num_classes)]
    for result in results:
        for index, value in enumerate(dice_per_class(result["pred"], result["target"], num_classes)):
            if value is not None:
                per_class[index].append(value)
    means = [float(np.mean(values)) for values in per_class if values]
    return float(np.mean(means)) if means else None
