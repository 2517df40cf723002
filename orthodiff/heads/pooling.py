"""Pooling one plane's feature map (B, C, d, h, w) into a vector (B, out_features)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..errors import OrthodiffError

POOLINGS = ("attention", "latent", "mean")


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


def make_pool(kind: str, channels: int, heads: int = 4) -> nn.Module:
    """``attention`` (self-attention + GAP), ``latent`` (latent-query) or ``mean`` (GAP only)."""
    if kind == "attention":
        return SelfAttentionPool(channels, heads=_fit_heads(channels, heads))
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
