"""Exact float32 numerics for stored and predicted features.

On Ampere and later GPUs PyTorch may run float32 convolutions and matrix products in TF32 and pick
cuDNN algorithms by speed, which can depend on the batch size. Features stored by ``extract`` and
those ``predict`` computes for one study must agree, so both run inside ``exact_float32()``.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off and cuDNN deterministic, without benchmarking, for the block; restored after."""
    import torch

    backends = torch.backends
    saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
             backends.cudnn.benchmark)
    backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.allow_tf32 = False
    backends.cudnn.deterministic = True
    backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
         backends.cudnn.benchmark) = saved


def device_record(device) -> dict:
    """What computed a set of features: device type and name, torch version, and the float32 settings."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "torch": torch.__version__, "tf32": False, "deterministic": True}
