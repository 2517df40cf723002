"""Training through the denoisers: classify in ``partial``/``full`` mode, segment in every mode.

Features are computed on the fly from (augmented) plane tensors with the same seeded noise as the
feature store. ``probe``: denoisers frozen (segmentation only); ``partial``: time embedding, input
convolution, encoder and middle block train at ``learning_rate * encoder_lr_scale``, the decoder is
frozen (and not run when only encoder/middle blocks are read); ``full``: every denoiser weight
trains at that rate.
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
    make_dice_ce_loss,
    masked_bce_loss,
    positive_weights,
)
from ..planes import PLANES
from .scoring import MetricsLog, auroc_scores, dice_per_class, patient_level

ENCODER_PARTS = ("time_embed", "conv_in", "down_blocks", "middle_block")


class Backbone(nn.Module):
    """The planes' denoisers read at one timestep: {plane: {block: (B, C, d, h, w)}}."""

    def __init__(self, denoisers: dict, timestep: int, blocks: list[str], seed: int, mode: str):
        super().__init__()
        self.denoisers = nn.ModuleDict(denoisers)
        self.extractors = {
            plane: FeatureExtractor(denoiser, [timestep], blocks, seed=seed) for plane, denoiser in denoisers.items()
        }
        self.mode = mode
        set_trainable(self.denoisers, mode)

    def forward(self, images: dict, study_ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "probe"):
            for plane, extractor in self.extractors.items():
                found = extractor(images[plane], study_ids)
                out[plane] = {block: value for (block, _), value in found.items()}
        return out


def set_trainable(denoisers: nn.ModuleDict, mode: str) -> None:
    for denoiser in denoisers.values():
        for name, parameter in denoiser.unet.named_parameters():
            if mode == "full":
                parameter.requires_grad_(True)
            elif mode == "partial":
                parameter.requires_grad_(name.split(".")[0] in ENCODER_PARTS)
            else:
                parameter.requires_grad_(False)


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


def make_accelerator(cfg):
    from accelerate import Accelerator

    precision = cfg.finetune.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision not in ("no", "fp16", "bf16"):
        raise OrthodiffError(f"finetune.mixed_precision={precision!r}: use auto, no, fp16 or bf16")
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


def fit_best_epoch(cfg, model: nn.Module, train_set, loss_of, validate, log: MetricsLog, metric: str):
    """Train ``model`` for ``finetune.epochs`` through Accelerate and keep its best validation epoch.

    ``loss_of(model, batch)`` gives the batch loss (None: nothing to learn from, skipped);
    ``validate(model, device)`` gives the validation score (None when undefined: the latest epoch
    is kept). Returns (model with the best epoch loaded, {"best_epoch", metric}).
    """
    ft = cfg.finetune
    accelerator = make_accelerator(cfg)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), weight_decay=float(ft.weight_decay))
    train_loader = _loader(train_set, ft.batch_size, True, cfg.seed, cfg.data.num_workers)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    best = {"score": -np.inf, "state": None, "epoch": -1, "value": None}
    for epoch in range(int(ft.epochs)):
        model.train()
        losses = []
        for batch in train_loader:
            batch = _to(batch, accelerator.device)
            with accelerator.autocast():
                loss = loss_of(model, batch)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if ft.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), float(ft.max_grad_norm))
            optimizer.step()
            losses.append(loss.item())
        unwrapped = accelerator.unwrap_model(model)
        value = validate(unwrapped, accelerator.device)
        score = value if value is not None else -epoch
        if score > best["score"]:
            best.update(score=score, epoch=epoch, value=value, state=copy.deepcopy(unwrapped.state_dict()))
        log.write(epoch=epoch, train_loss=float(np.mean(losses)) if losses else None, **{metric: value})
    model = accelerator.unwrap_model(model)
    model.load_state_dict(best["state"])
    return model, {"best_epoch": best["epoch"], metric: best["value"]}


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

    return fit_best_epoch(cfg, model, datasets["train"], loss_of, validate, log, "val_macro_auroc")


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
    ft = cfg.finetune
    any_denoiser = next(iter(denoisers.values()))
    bottleneck, skips = segmentation_blocks(any_denoiser)
    timestep = int(cfg.features.timesteps[0])
    torch.manual_seed(int(cfg.seed))
    backbone = Backbone(denoisers, timestep, [bottleneck, *skips], cfg.seed, ft.mode)
    shapes = {p: {b: d.feature_shape(b) for b in [bottleneck, *skips]} for p, d in denoisers.items()}
    plane_size = {p: tuple(d.plane_size) for p, d in denoisers.items()}
    head = SegmentationModel(shapes, plane_size, bottleneck, skips, num_classes, pooling=ft.pooling,
                             width=int(ft.decoder_width), image_channels=1)
    model = EndToEndSegmenter(backbone, head)
    loss_fn = make_dice_ce_loss()
    planes = list(head.planes)

    def loss_of(model, batch):
        return segmentation_loss(model(batch), batch, planes, loss_fn)

    def validate(model, device):
        return mean_dice(predict_segmenter(model, datasets["val"], cfg, device), num_classes)

    return fit_best_epoch(cfg, model, datasets["train"], loss_of, validate, log, "val_mean_dice")


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
