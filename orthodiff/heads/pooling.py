"""Pooling one plane's feature map (B, C, d, h, w) into a vector (B, out_features)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..errors import OrthodiffError

POOLINGS = ("attention", "latent", "mean", "attention_max", "grid", "grid_max")
DEFAULT_READOUT_GRID = (1, 2, 2)


def _check_heads(channels: int, heads: int, field: str) -> None:
    if channels < 1 or heads < 1 or channels % heads:
        raise OrthodiffError(f"{field}: {channels} feature channels do not split into {heads} attention heads")


class SelfAttentionPool(nn.Module):
    """The paper's pool: self-attention over the flattened map, mean over tokens, concatenated
    with a global average pool of the raw map. Output: 2 * channels."""

    def __init__(self, channels: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        _check_heads(channels, heads, "SelfAttentionPool")
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, dropout=dropout, batch_first=True)
        self.out_features = 2 * channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(features, "b c ... -> b (...) c")
        normed = self.norm(tokens)
        attended, _ = self.attention(normed, normed, normed, need_weights=False)
        return torch.cat([(tokens + attended).mean(dim=1), tokens.mean(dim=1)], dim=1)


class LatentQueryPool(nn.Module):
    """A learned query attends over the flattened map (timm ``AttentionPoolLatent``). Output: channels."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        from timm.layers import AttentionPoolLatent

        _check_heads(channels, heads, "LatentQueryPool")
        self.pool = AttentionPoolLatent(channels, num_heads=heads, mlp_ratio=2.0)
        self.out_features = channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool(rearrange(features, "b c ... -> b (...) c"))


class MeanPool(nn.Module):
    """Global average pool: the linear-probe baseline. Output: channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_features = channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(2).mean(dim=2)


class AttentionMaxPool(nn.Module):
    """The paper's pool beside a global max pool: a lesion a few voxels wide moves the max of
    its channels even when the averages over the whole map barely change. Output: 3 * channels."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.attention = SelfAttentionPool(channels, heads=heads)
        self.out_features = 3 * channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attention(features), features.flatten(2).amax(dim=2)], dim=1)


class GridPool(nn.Module):
    """A readout that keeps coarse layout: the map average-pooled to a small (d, h, w) grid and
    flattened, so where a finding lies reaches the head instead of being averaged away.
    ``with_max`` adds the max of every grid cell. Output: channels * cells (x2 with max)."""

    def __init__(self, channels: int, grid=DEFAULT_READOUT_GRID, with_max: bool = False):
        super().__init__()
        self.grid = check_readout_grid(grid)
        self.with_max = bool(with_max)
        cells = self.grid[0] * self.grid[1] * self.grid[2]
        self.out_features = channels * cells * (2 if self.with_max else 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = [nn.functional.adaptive_avg_pool3d(features, self.grid)]
        if self.with_max:
            parts.append(nn.functional.adaptive_max_pool3d(features, self.grid))
        return rearrange(torch.cat(parts, dim=1), "b c d h w -> b (c d h w)")


def check_readout_grid(grid) -> tuple[int, int, int]:
    """Three positive cell counts (d, h, w); one clear line otherwise."""
    try:
        cells = tuple(int(v) for v in grid)
    except (TypeError, ValueError):
        cells = ()
    if len(cells) != 3 or min(cells) < 1:
        raise OrthodiffError(f"finetune.readout_grid={list(grid) if grid is not None else grid}: give three positive "
                             "cell counts [d, h, w], e.g. [1, 2, 2]")
    return cells


def make_pool(kind: str, channels: int, heads: int = 4, grid=DEFAULT_READOUT_GRID) -> nn.Module:
    """``attention`` (self-attention + GAP), ``latent`` (latent-query), ``mean`` (GAP only),
    ``attention_max`` (attention + GAP + global max), ``grid`` (average over a coarse ``grid`` of
    cells, flattened) or ``grid_max`` (average and max of each cell)."""
    if kind == "attention":
        return SelfAttentionPool(channels, heads=_fit_heads(channels, heads))
    if kind == "attention_max":
        return AttentionMaxPool(channels, heads=_fit_heads(channels, heads))
    if kind in ("grid", "grid_max"):
        return GridPool(channels, grid, with_max=kind == "grid_max")
    if kind == "latent":
        return LatentQueryPool(channels, heads=_fit_heads(channels, heads))
    if kind == "mean":
        return MeanPool(channels)
    raise OrthodiffError(f"finetune.pooling={kind!r}: use one of {', '.join(POOLINGS)}")


def _fit_heads(channels: int, heads: int) -> int:
    """The largest head count <= ``heads`` that divides ``channels`` (small test models have odd widths)."""
    for candidate in range(min(heads, channels), 0, -1):
        if channels % candidate == 0:
            return candidate
    return 1
