"""Experiment configuration: dataclasses, layered YAML files and ``key=value`` overrides.

Every stage reads one ``ExperimentConfig``. Files are merged left to right, then overrides;
a key that does not exist is an error that names it. The resolved config is saved with a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import OrthodiffError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SeriesSelection:
    """Which series of an archive a run uses; empty lists and null mean "any"."""

    planes: list = field(default_factory=list)  # sagittal, coronal, axial
    contrasts: list = field(default_factory=list)  # pd, t1, t2, stir, gre, other
    fat_suppressed: Optional[bool] = None
    description_regex: Optional[str] = None  # matched against SeriesDescription / ProtocolName
    # when a study holds several series of one plane: the first rule that separates them wins
    prefer: list = field(default_factory=lambda: ["fat_suppressed", "most_slices"])


@dataclass
class DataConfig:
    joint: str = "knee"
    archive: str = "runs/archive"
    manifest: str = "runs/manifest.parquet"
    cache: str = "runs/cache"
    splits: str = "runs/splits.json"
    # Plane tensor size (D, H, W) per plane: D slices along the normal, H x W in-plane.
    plane_size: dict = field(
        default_factory=lambda: {"sagittal": [16, 64, 64], "coronal": [16, 64, 64], "axial": [16, 64, 64]}
    )
    # mm: resample slices to this thickness before cropping to D (thin-slice 3D scans); null keeps them
    slice_spacing: Optional[float] = None
    # crop: keep the central D slices; fit: resample across slices so the whole slab becomes D slices
    slab: str = "crop"
    # mm per plane [D, H, W] (null: that axis whole): crop each series to a field of view centred on the joint
    # (the series' centre, or the manifest's joint_centre_ras) before resizing, e.g. {sagittal: [null, 100, 100]};
    # empty: the whole field of view
    field_of_view_mm: dict = field(default_factory=dict)
    series: SeriesSelection = field(default_factory=SeriesSelection)
    labels: list = field(default_factory=list)  # empty: every label column of the manifest
    ehr_columns: list = field(default_factory=lambda: ["age", "sex", "height", "weight"])
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    label_fractions: list = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1, 0.05])
    num_workers: int = 0


@dataclass
class DenoiserConfig:
    """MONAI DiffusionModelUNet settings for one plane (the paper's reference by default)."""

    in_channels: int = 1
    base_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 1
    attention_levels: list = field(default_factory=lambda: [False, False, False, False, True])
    num_head_channels: int = 32
    norm_num_groups: int = 32
    sdpa: bool = True
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # or v_prediction
    min_snr_gamma: Optional[float] = None
    sample_steps: int = 25  # DDIM steps for the preview pictures


@dataclass
class PretrainConfig:
    plane: str = "all"
    output_dir: str = "runs/pretrain"
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0  # AdamW; 0 is the paper's Adam
    lr_scheduler: str = "cosine"  # diffusers get_scheduler name, with warmup_steps of warmup
    warmup_steps: int = 100
    max_steps: int = 10000
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else no
    ema_decay: float = 0.995
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: bool = True
    log_every: int = 10
    preview_every: int = 1000  # 0: no preview pictures
    preview_count: int = 4  # volumes per preview picture
    tracker: str = "wandb"  # wandb (offline unless configured), tensorboard or none
    augment: bool = False
    # denoising loss of the EMA weights on held-out (val) volumes at fixed timesteps and seeded noise,
    # every eval_every steps into <plane>/metrics.jsonl and <plane>/heldout_loss.png (0: never); when
    # on, the val patients are held out of pretraining (else pretraining learns from train + val)
    eval_every: int = 0
    eval_volumes: int = 8  # held-out volumes scored (the first in series order)
    # train on random crops of the planes: [D, H, W] for every plane or {plane: [D, H, W]} (a plane left out, null
    # or empty: whole planes); each crop lies inside the plane, drawn from (seed, step, rank). The held-out loss and
    # the features always read whole planes (the denoiser is convolutional)
    patch_size: Any = None


@dataclass
class FeatureConfig:
    timesteps: list = field(default_factory=lambda: [100])
    blocks: list = field(default_factory=lambda: ["mid"])
    noise_draws: int = 1  # average features over this many seeded noise draws
    average_timesteps: bool = False  # one feature per block, averaged over `timesteps`
    batch_size: int = 4
    dtype: str = "float16"  # float16 or float32 on disk
    output_dir: str = "runs/features"
    overwrite: bool = False  # rebuild a store that was built with other settings


@dataclass
class FinetuneConfig:
    task: str = "classify"  # or segment
    mode: str = "probe"  # probe, grid, partial, full
    init: str = "pretrained"  # or scratch
    labels_fraction: float = 1.0
    pretrained: str = "runs/pretrain"
    output_dir: str = "runs/finetune"
    pooling: str = "attention"  # attention (self-attention + GAP) or latent (latent-query pool)
    fusion: str = "concat"  # concat or gated
    use_ehr: bool = False
    batch_size: int = 8
    epochs: int = 50
    # optimizer steps instead of epochs when set; validation every eval_every steps (0: once an epoch),
    # stopping after `patience` validations without improvement (null: never early)
    max_steps: Optional[int] = None
    eval_every: int = 0
    patience: Optional[int] = None
    learning_rate: float = 1e-3
    encoder_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    pos_weight: bool = False
    augment: bool = True  # torchio augmentation in partial/full/segment runs (never on cached features)
    grid_learning_rates: list = field(default_factory=lambda: [1e-3, 3e-4, 1e-4])
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else no
    # end-to-end runs (fine-tuning, segmentation, DynUNet): 3D convolutions in channels-last memory order
    # (benchmarks/segment_throughput.py); same arithmetic in another summation order, so not bit-identical
    channels_last: bool = False
    # learning rate over the run: constant, or poly (nnU-Net's (1 - step / total) ** 0.9, as the DynUNet
    # reference always trains)
    lr_schedule: str = "constant"
    decoder_width: int = 16  # least channels of a segmentation decoder level
    # segment (decoder): convolution blocks that read the plane tensor at full resolution before it joins the
    # decoder's last block (0: the raw tensor joins); the encoder's finest features are at half resolution
    decoder_image_stem: int = 2
    classes: list = field(default_factory=list)  # segmentation class names; empty: <data.archive>/archive.json
    source_geometry: bool = False  # segment: also write each prediction on the series' original voxel grid
    # segment: "decoder" (a decoder on the middle block and encoder levels) or "pixel" (DDPM-segmentation:
    # decoder activations at several blocks and timesteps, upsampled to the plane size, a per-voxel head)
    segmenter: str = "decoder"
    pixel_blocks: list = field(default_factory=list)  # pixel: blocks read; empty: every decoder block (up0, up1, ...)
    pixel_timesteps: list = field(default_factory=lambda: [50, 150])  # pixel: timesteps read (small: little noise)
    # pixel: choose on validation among {all blocks, the finer half} x {all timesteps, each alone}; false: use all
    pixel_grid: bool = True
    pixel_hidden: int = 32  # pixel: width of the per-voxel head
    # segment: weigh Dice + CE per class by training voxel frequency ** -0.5 (thin structures keep a say)
    class_balance: bool = True
    # pooling also takes attention_max (attention + GAP + global max), grid (maps average-pooled to
    # readout_grid cells and flattened, so a finding's place survives) and grid_max (average and max per cell)
    readout_grid: list = field(default_factory=lambda: [1, 2, 2])  # cells (d, h, w) of the grid pools
    # per plane, concatenate this many (block, timestep) maps as one feature (resized to the first's grid):
    # grid mode keeps each plane's best k on validation, the other modes the first k of blocks x timesteps
    concat_features: int = 1


@dataclass
class TrackingConfig:
    project: str = "orthodiff"
    run_name: Optional[str] = None


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


PRESET_RULE = (
    "a bare name (no '/' and no .yaml/.yml suffix) is always a preset shipped in configs/; "
    "anything else is a file path, so write ./NAME for a file NAME in this folder"
)


def preset_names() -> list[str]:
    """The presets shipped in ``configs/``, by the names ``-c`` takes."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def is_preset_name(name: str | Path) -> bool:
    """A bare name always means a shipped preset, never a file or folder that happens to share it."""
    text = str(name)
    has_separator = "/" in text or (os.sep != "/" and os.sep in text)
    return not has_separator and Path(text).suffix.lower() not in (".yaml", ".yml")


def resolve_config_path(name: str | Path) -> Path:
    """The file for a ``-c`` value: a preset name (``tiny`` -> configs/tiny.yaml) or a path (see PRESET_RULE)."""
    if is_preset_name(name):
        preset = CONFIG_DIR / f"{name}.yaml"
        if not preset.is_file():
            raise OrthodiffError(
                f"config preset {str(name)!r} does not exist; presets: {', '.join(preset_names())} "
                f"(for a file in this folder write ./{name})"
            )
        return preset
    path = Path(name)
    if path.is_dir():
        raise OrthodiffError(f"config file {name}: is a folder; give a YAML file")
    if not path.is_file():
        raise OrthodiffError(f"config file {name}: not found; give a YAML file or one of the presets "
                             f"{', '.join(preset_names())}")
    return path


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    section: Optional[str] = None,
) -> ExperimentConfig:
    """Merge YAML files and ``key=value`` overrides onto the defaults.

    With ``section`` (e.g. ``"pretrain"``), a dotless key that is not top-level is looked up in
    that section, so ``plane=axial`` means ``pretrain.plane=axial`` for the pretrain command.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    merged = OmegaConf.structured(ExperimentConfig)
    for file in files:
        path = resolve_config_path(file)
        layer = _load_layer(path)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise OrthodiffError(f"config file {path}: {_describe(exc)}") from exc
    for override in overrides:
        if "=" not in override:
            raise OrthodiffError(f"override {override!r}: expected key=value, e.g. pretrain.max_steps=100")
        key, value = override.split("=", 1)
        key = _qualify(key.strip(), section)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except YAMLError:
            raise OrthodiffError(
                f"override {override!r}: the value is not valid YAML; quote it or write lists as [a, b]"
            ) from None
        except OmegaConfBaseException as exc:
            raise OrthodiffError(f"override {override!r}: {_describe(exc)}") from exc
    config = OmegaConf.to_object(merged)
    check_plane_sizes(config.data.plane_size)
    return config


# Bounds of a plane tensor (D slices, H x W pixels): beyond them a size is a typo, not a scan.
SLICE_LIMITS = (1, 1024)
PIXEL_LIMITS = (8, 2048)


def check_plane_sizes(plane_size, source: str = "data.plane_size") -> None:
    """Every ``{plane: [D, H, W]}`` entry holds integers within SLICE_LIMITS and PIXEL_LIMITS."""
    if not hasattr(plane_size, "items"):
        raise OrthodiffError(f"{source}: expected a mapping plane -> [D, H, W], got {plane_size!r}")
    for plane, size in plane_size.items():
        check_plane_size_entry(size, f"{source}.{plane}")


def check_plane_size_entry(size, source: str) -> tuple[int, int, int]:
    """``[D, H, W]`` as ints; one line naming ``source`` when it is not three integers within bounds."""
    expected = (
        f"expected three integers [D, H, W] with D in {SLICE_LIMITS[0]}..{SLICE_LIMITS[1]} slices and H, W in "
        f"{PIXEL_LIMITS[0]}..{PIXEL_LIMITS[1]} pixels"
    )
    try:
        values = [float(v) for v in size]
    except (TypeError, ValueError):
        raise OrthodiffError(f"{source}: {expected}, got {size!r}") from None
    if len(values) != 3 or not all(v.is_integer() for v in values):
        raise OrthodiffError(f"{source}: {expected}, got {list(size)!r}")
    depth, height, width = (int(v) for v in values)
    within = SLICE_LIMITS[0] <= depth <= SLICE_LIMITS[1] and all(
        PIXEL_LIMITS[0] <= v <= PIXEL_LIMITS[1] for v in (height, width)
    )
    if not within:
        raise OrthodiffError(f"{source}: {expected}, got {list(size)!r}")
    return depth, height, width


def _load_layer(path: Path):
    """One config file as an OmegaConf mapping; anything else at its top level is one line."""
    import yaml
    from omegaconf import OmegaConf

    try:
        # OmegaConf.load would read a lone word as a key and fail on a lone number: check the shape first
        top = yaml.safe_load(path.read_text(encoding="utf-8"))
        if top is not None and not isinstance(top, dict):
            raise OrthodiffError(
                f"config file {path}: the top level is {_kind(top)}, not a mapping of sections; "
                "write keys such as `seed: 0` and `data:` at the top level"
            )
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise OrthodiffError(f"config file {path}: {_describe_yaml(exc)}") from None
    except UnicodeDecodeError:
        raise OrthodiffError(f"config file {path}: not UTF-8 text; give a YAML file") from None


def _kind(value) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the value {value}"
    return f"the value {value!r}" if isinstance(value, str) else f"the number {value}"


def _qualify(key: str, section: Optional[str]) -> str:
    if "." in key or section is None:
        return key
    top_level = ExperimentConfig.__dataclass_fields__
    if key in top_level:
        return key
    section_fields = top_level[section].default_factory().__dataclass_fields__
    if key in section_fields:
        return f"{section}.{key}"
    return key


def _describe(exc: Exception) -> str:
    message = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    if "not in struct" in message or "Key" in type(exc).__name__:
        return f"key {key or message} does not exist; check the spelling against configs/reference.yaml"
    return f"{message} (key {key})" if key else message


def _describe_yaml(exc: Exception) -> str:
    """A YAML syntax error as one line with its line and column (1-based), as editors count."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"invalid YAML at {where}{problem}" + (f" ({context})" if context else "") + "; fix the file's syntax"


def config_to_dict(config: ExperimentConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_from_dict(data: dict) -> ExperimentConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data))


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML beside a run's outputs."""
    from omegaconf import OmegaConf

    from .fileio import write_text

    write_text(path, OmegaConf.to_yaml(OmegaConf.structured(config)))
