"""The denoisers that features come from: pretrained checkpoints or a same-config random init."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import OrthodiffError
from ..planes import PLANES

INITS = ("pretrained", "scratch")


def build_denoisers(cfg, planes: Sequence[str], plane_size: Mapping[str, Sequence[int]], device="cpu") -> dict:
    """{plane: Denoiser} for ``cfg.finetune.init``: loaded from ``<finetune.pretrained>/denoisers``,
    or randomly initialised (seeded by ``cfg.seed`` and the plane) with the same ``model`` config.

    Each denoiser must be of its plane and built for the cache's plane size.
    """
    from ..models.denoiser import Denoiser, load_denoisers

    init = cfg.finetune.init
    if init not in INITS:
        raise OrthodiffError(f"finetune.init={init!r}: use pretrained or scratch")
    planes = [plane for plane in PLANES if plane in planes]
    if init == "pretrained":
        directory = Path(cfg.finetune.pretrained) / "denoisers"
        available = [plane for plane in planes if (directory / plane / "config.json").exists()]
        if not available:
            raise OrthodiffError(
                f"{directory}: no denoiser for planes {planes}; run `orthodiff pretrain` or set finetune.pretrained"
            )
        denoisers = load_denoisers(directory, planes=available, config=cfg.model, device=device)
    else:
        denoisers = {}
        for plane in planes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_plane_seed(cfg.seed, plane))
                denoisers[plane] = Denoiser(cfg.model, plane, plane_size[plane], cfg.diffusion).to(device).eval()
    for plane, denoiser in denoisers.items():
        if denoiser.plane != plane:
            raise OrthodiffError(f"denoiser for {plane} is the {denoiser.plane} checkpoint; use the {plane} checkpoint")
        if list(denoiser.plane_size) != [int(v) for v in plane_size[plane]]:
            raise OrthodiffError(
                f"{plane} denoiser was built for plane size {list(denoiser.plane_size)} but the cache holds "
                f"{list(plane_size[plane])}; prepare the cache at the denoiser's size (data.plane_size)"
            )
    return denoisers


def denoiser_fingerprint(denoiser) -> str:
    """sha256 of what shapes the features: plane, size, architecture, schedule and every weight."""
    from ..models.denoiser import ARCHITECTURE_FIELDS

    config = denoiser.config_dict()
    described = {
        "plane": config["plane"],
        "plane_size": config["plane_size"],
        "model": {key: config["model"][key] for key in ARCHITECTURE_FIELDS},
        "diffusion": config["diffusion"],
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, value in sorted(denoiser.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _plane_seed(seed: int, plane: str) -> int:
    return int.from_bytes(hashlib.sha256(f"orthodiff-init/{int(seed)}/{plane}".encode()).digest()[:8], "little") & (2**63 - 1)
