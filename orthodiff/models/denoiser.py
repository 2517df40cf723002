"""One 3D denoiser per plane: MONAI ``DiffusionModelUNet`` with named feature blocks.

The forward pass is written out over MONAI's own submodules (time embedding, ``conv_in``,
``down_blocks``, ``middle_block``, ``up_blocks``, ``out``) so that :meth:`Denoiser.features` can
stop after the last block it needs, and so that each block can be gradient-checkpointed.
A test checks it against MONAI's ``forward`` and against forward hooks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..config import DenoiserConfig, DiffusionConfig
from ..errors import OrthodiffError
from ..fileio import atomic_path, read_format_json, write_json
from ..planes import PLANES, check_plane
from .diffusion import check_diffusion_config

FORMAT = "orthodiff-denoiser"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Fields that shape the weights; the others are runtime options a checkpoint may be loaded with.
ARCHITECTURE_FIELDS = (
    "in_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_levels",
    "num_head_channels",
    "norm_num_groups",
)


class Denoiser(nn.Module):
    """A per-plane 3D denoiser: ``forward(x (B,1,D,H,W), timesteps (B,)) -> prediction``."""

    def __init__(
        self,
        config: DenoiserConfig,
        plane: str,
        plane_size: Sequence[int],
        diffusion: Optional[DiffusionConfig] = None,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.plane = check_plane(plane)
        self.config = config
        self.diffusion = check_diffusion_config(diffusion if diffusion is not None else DiffusionConfig())
        self.channels = check_denoiser_config(config)
        self.plane_size = check_plane_size(plane_size, len(self.channels), plane)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=int(config.in_channels),
            out_channels=int(config.in_channels),
            num_res_blocks=int(config.num_res_blocks),
            channels=self.channels,
            attention_levels=tuple(bool(level) for level in config.attention_levels),
            norm_num_groups=int(config.norm_num_groups),
            num_head_channels=int(config.num_head_channels),
            use_flash_attention=bool(config.sdpa),
        )
        if config.channels_last:
            self.to(memory_format=torch.channels_last_3d)
        if config.compile:
            self.compile_blocks()

    # ----------------------------------------------------------------------------- structure
    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def block_names(self) -> list[str]:
        """Feature blocks in forward order: ``down0.., mid, up0..``."""
        levels = range(self.num_levels)
        return [f"down{i}" for i in levels] + ["mid"] + [f"up{i}" for i in levels]

    def feature_channels(self, block: str) -> int:
        return self.feature_shape(block)[0]

    def feature_shape(self, block: str) -> tuple[int, int, int, int]:
        """(C, d, h, w) of a block's output for this plane size."""
        self._check_blocks([block])
        last = self.num_levels - 1
        if block == "mid":
            channels, halvings = self.channels[-1], last
        else:
            index = int(block[2:] if block.startswith("up") else block[4:])
            if block.startswith("down"):
                channels, halvings = self.channels[index], min(index + 1, last)
            else:
                channels, halvings = self.channels[::-1][index], max(last - 1 - index, 0)
        scale = 2**halvings
        depth, height, width = self.plane_size
        return (channels, depth // scale, height // scale, width // scale)

    def compile_blocks(self) -> None:
        """torch.compile each block in place (parameter names stay unchanged for checkpoints)."""
        unet = self.unet
        for module in [unet.time_embed, unet.conv_in, *unet.down_blocks, unet.middle_block, *unet.up_blocks, unet.out]:
            module.compile()

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self._run(x, timesteps, wanted=set(), stop_after=None)[0]

    def features(self, x: torch.Tensor, timesteps: torch.Tensor, blocks: Iterable[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named blocks; the forward pass stops after the last one requested."""
        blocks = list(blocks)
        if not blocks:
            raise OrthodiffError("features: no blocks requested; name at least one of " + ", ".join(self.block_names()))
        self._check_blocks(blocks)
        order = self.block_names()
        stop_after = max(blocks, key=order.index)
        return self._run(x, timesteps, wanted=set(blocks), stop_after=stop_after)[1]

    def _run(self, x, timesteps, wanted: set, stop_after: Optional[str]):
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        unet = self.unet
        if self.config.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        timesteps = _batch_timesteps(timesteps, x.shape[0], x.device)
        found: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> bool:
            if name in wanted:
                found[name] = value
            return name == stop_after

        # Same order and arguments as DiffusionModelUNet.forward (MONAI 1.4+).
        emb = unet.time_embed(get_timestep_embedding(timesteps, self.channels[0]).to(dtype=x.dtype))
        h = unet.conv_in(x)
        skips = [h]
        for index, block in enumerate(unet.down_blocks):
            h, residuals = self._call(block, hidden_states=h, temb=emb)
            skips.extend(residuals)
            if keep(f"down{index}", h):
                return None, found
        h = self._call(unet.middle_block, hidden_states=h, temb=emb)
        if keep("mid", h):
            return None, found
        for index, block in enumerate(unet.up_blocks):
            count = len(block.resnets)
            residuals, skips = skips[-count:], skips[:-count]
            h = self._call(block, hidden_states=h, res_hidden_states_list=residuals, temb=emb)
            if keep(f"up{index}", h):
                return None, found
        return unet.out(h), found

    def _call(self, block: nn.Module, **inputs):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, use_reentrant=False, **inputs)
        return block(**inputs)

    def _check_blocks(self, blocks: Iterable[str]) -> None:
        names = self.block_names()
        unknown = [block for block in blocks if block not in names]
        if unknown:
            raise OrthodiffError(
                f"feature block {unknown[0]!r} does not exist in this denoiser; use one of {', '.join(names)}"
            )

    # ------------------------------------------------------------------------ checkpoints
    def config_dict(self) -> dict:
        """The JSON that rebuilds this denoiser (config.json of a checkpoint directory)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "plane": self.plane,
            "plane_size": list(self.plane_size),
            "model": dataclasses.asdict(self.config),
            "diffusion": dataclasses.asdict(self.diffusion),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights first: config.json marks it complete)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().to("cpu").contiguous() for name, value in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "orthodiff": FORMAT})
        write_json(directory / CONFIG_NAME, self.config_dict())
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        plane: Optional[str] = None,
        config: Optional[DenoiserConfig] = None,
        device: str | torch.device = "cpu",
    ) -> "Denoiser":
        """Rebuild a denoiser from a checkpoint directory.

        ``plane`` and ``config`` (when given) must match the checkpoint; the runtime options of
        ``config`` (sdpa, gradient_checkpointing, channels_last, compile) are applied.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        saved = read_checkpoint_config(directory)
        if plane is not None and saved["plane"] != check_plane(plane):
            raise OrthodiffError(
                f"{directory}: this checkpoint is the {saved['plane']} denoiser, not {plane}; "
                f"use the {plane} checkpoint directory"
            )
        saved_config = _config_from_json(DenoiserConfig, saved["model"], directory, "model")
        if config is not None:
            differences = architecture_differences(saved_config, config)
            if differences:
                raise OrthodiffError(
                    f"{directory}: checkpoint was trained with another model configuration ({differences}); "
                    "use the model config it was trained with"
                )
            runtime = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ARCHITECTURE_FIELDS}
            saved_config = dataclasses.replace(saved_config, **runtime)
        # Build without compile, load, then compile: loading never depends on compilation.
        compile_after = bool(saved_config.compile)
        build_config = dataclasses.replace(saved_config, compile=False)
        diffusion = _config_from_json(DiffusionConfig, saved.get("diffusion", {}), directory, "diffusion")
        model = cls(build_config, saved["plane"], saved["plane_size"], diffusion)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.exists():
            raise OrthodiffError(f"{weights_path}: weights file missing; save the checkpoint again")
        try:
            state = load_file(str(weights_path))
        except Exception as exc:  # noqa: BLE001  safetensors raises its own error types on a damaged file
            raise OrthodiffError(
                f"{weights_path}: not a readable safetensors file ({' '.join(str(exc).split())}); "
                "it is truncated or damaged: run `orthodiff pretrain` again (it writes it) or copy the checkpoint again"
            ) from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes differ
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shape mismatch")
            raise OrthodiffError(
                f"{weights_path}: weights do not match {CONFIG_NAME} ({detail}); the directory is damaged or mixed"
            ) from None
        if missing or unexpected:
            name = (missing or unexpected)[0]
            raise OrthodiffError(
                f"{weights_path}: weights do not match {CONFIG_NAME} ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {name}); the directory is damaged or mixed"
            )
        model.config = dataclasses.replace(model.config, compile=compile_after)
        model.to(device)
        if compile_after:
            model.compile_blocks()
        return model.eval()


def load_denoisers(
    directory: str | Path,
    planes: Optional[Sequence[str]] = None,
    config: Optional[DenoiserConfig] = None,
    device: str | torch.device = "cpu",
) -> dict[str, Denoiser]:
    """Every plane's denoiser under ``<pretrain.output_dir>/denoisers`` (or only ``planes``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OrthodiffError(f"{directory}: no such denoisers directory; run `orthodiff pretrain` first")
    wanted = list(planes) if planes is not None else [p for p in PLANES if (directory / p / CONFIG_NAME).exists()]
    if not wanted:
        raise OrthodiffError(f"{directory}: holds no denoiser (expected <plane>/{CONFIG_NAME}); run `orthodiff pretrain` first")
    return {plane: Denoiser.from_pretrained(directory / plane, plane=plane, config=config, device=device) for plane in wanted}


# ------------------------------------------------------------------------------- checks
def check_denoiser_config(config: DenoiserConfig) -> tuple[int, ...]:
    """Validate ``model.*`` and return the channels per level."""
    mult = list(config.channel_mult)
    if int(config.base_channels) < 1 or not mult or any(int(m) < 1 for m in mult):
        raise OrthodiffError(
            f"model.base_channels={config.base_channels}, model.channel_mult={mult}: need a positive width and "
            "at least one positive multiplier"
        )
    if int(config.in_channels) < 1:
        raise OrthodiffError(f"model.in_channels={config.in_channels}: must be at least 1")
    if len(config.attention_levels) != len(mult):
        raise OrthodiffError(
            f"model.attention_levels has {len(config.attention_levels)} entries but model.channel_mult has "
            f"{len(mult)}; give one true/false per level"
        )
    if int(config.num_res_blocks) < 1:
        raise OrthodiffError(f"model.num_res_blocks={config.num_res_blocks}: must be at least 1")
    channels = tuple(int(config.base_channels) * int(m) for m in mult)
    groups = int(config.norm_num_groups)
    if groups < 1 or any(c % groups for c in channels):
        raise OrthodiffError(
            f"model.norm_num_groups={groups}: every level width {list(channels)} must be a multiple of it"
        )
    heads = int(config.num_head_channels)
    attended = [c for c, level in zip(channels, config.attention_levels) if level]
    if heads < 1 or any(c % heads for c in attended):
        raise OrthodiffError(
            f"model.num_head_channels={heads}: the attention level widths {attended} must be multiples of it"
        )
    return channels


def check_plane_size(plane_size: Sequence[int], levels: int, plane: str) -> tuple[int, int, int]:
    size = tuple(int(s) for s in plane_size)
    if len(size) != 3 or any(s < 1 for s in size):
        raise OrthodiffError(f"data.plane_size.{plane}={list(plane_size)}: give three positive sizes [D, H, W]")
    check_halvable(size, levels, f"data.plane_size.{plane}", "volume")
    return size


def check_halvable(size: Sequence[int], levels: int, field: str, what: str) -> None:
    """Each size a multiple of 2^(levels-1): the network halves every axis levels-1 times and joins its
    skips at each size, so an axis it cannot halve evenly fails."""
    factor = 2 ** (levels - 1)
    if any(s % factor for s in size):
        raise OrthodiffError(
            f"{field}={list(size)}: each size must be a multiple of {factor} "
            f"for a denoiser with {levels} levels (it halves the {what} {levels - 1} times)"
        )


def architecture_differences(saved: DenoiserConfig, wanted: DenoiserConfig) -> str:
    """'field saved -> wanted, ...' for the weight-shaping fields that differ ('' when none)."""
    changes = []
    for name in ARCHITECTURE_FIELDS:
        a, b = _plain(getattr(saved, name)), _plain(getattr(wanted, name))
        if a != b:
            changes.append(f"model.{name} {a} in the checkpoint vs {b} asked")
    return ", ".join(changes)


def read_checkpoint_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise OrthodiffError(f"{directory}: not a denoiser checkpoint ({CONFIG_NAME} missing); give a denoisers/<plane> directory")
    saved = read_format_json(path, FORMAT, "denoiser config", "the checkpoint is damaged")
    if not isinstance(saved.get("version"), int):
        raise OrthodiffError(f"{path}: field 'version' missing or not an integer; the checkpoint is damaged")
    if saved["version"] > VERSION:
        raise OrthodiffError(f"{path}: written by a newer orthodiff (version {saved['version']}); upgrade orthodiff")
    for key in ("plane", "plane_size", "model"):
        if key not in saved:
            raise OrthodiffError(f"{path}: field {key!r} missing; the checkpoint is damaged")
    return saved


def _config_from_json(cls, values: dict, directory: Path, section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OrthodiffError(
            f"{directory / CONFIG_NAME}: unknown {section} field {unknown[0]!r}; written by another orthodiff version"
        )
    return cls(**values)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _batch_timesteps(timesteps, batch: int, device) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(batch)
    if timesteps.shape != (batch,):
        raise OrthodiffError(f"timesteps of shape {tuple(timesteps.shape)}: expected ({batch},) or a scalar")
    return timesteps


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: Denoiser) -> str:
    millions = num_parameters(model) / 1e6
    return f"{model.plane} denoiser: {model.num_levels} levels, widths {list(model.channels)}, {millions:.2f} M parameters"


__all__ = ["Denoiser", "load_denoisers", "describe", "num_parameters", "ARCHITECTURE_FIELDS"]
