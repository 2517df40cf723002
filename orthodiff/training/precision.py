"""The mixed precision of a training process, chosen one way for pretraining and fine-tuning.

Accelerate keeps one precision per process (a second ``Accelerator`` asking for another one is
refused), and the benches pretrain then fine-tune in one process; so ``auto`` resolves the same way
in both stages.
"""

from __future__ import annotations

import os

PRECISIONS = ("auto", "no", "fp16", "bf16")


def choose_mixed_precision(setting: str, field: str) -> str:
    """``no``, ``fp16`` or ``bf16`` for the config value ``setting`` of ``field``.

    ``auto``: fp16 or bf16 when ``accelerate launch`` asked for it (``ACCELERATE_MIXED_PRECISION``; its
    ``no``, the launcher's default, leaves the choice here); else bf16 on a GPU that computes in bf16
    natively (compute capability 8.0 and up: A100, H100, RTX 30xx and later), fp16 on an older GPU
    (V100, T4 only emulate bf16, many times slower), and no on the CPU.
    """
    from ..errors import OrthodiffError

    if setting not in PRECISIONS:
        raise OrthodiffError(f"{field}={setting!r}: use one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched in ("fp16", "bf16"):
        return launched
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if native_bf16() else "fp16"


def native_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 itself, not by emulation."""
    import torch

    major, _ = torch.cuda.get_device_capability()
    return major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False)
