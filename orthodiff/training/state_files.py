"""Nested training state (optimizer, LR schedule, EMA, RNG) as safetensors + JSON, never pickle.

A state is a tree of dicts, lists, tuples, numbers, strings, tensors and NumPy arrays. Its
tensors go into ``<name>.safetensors``; the tree, with each tensor replaced by a reference, into
``<name>.json``. Reading it back runs no code from the files, so a tampered checkpoint can at
worst fail to load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_path, write_json

_TENSOR, _ARRAY, _TUPLE, _DICT, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__"


def save_state(directory: Path, name: str, state) -> list[str]:
    """Write ``state`` as ``name.json`` (+ ``name.safetensors`` when it holds tensors); the file names."""
    import torch
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _encode(state, tensors, torch)
    files = [f"{name}.json"]
    if tensors:
        with atomic_path(Path(directory) / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        files.append(f"{name}.safetensors")
    write_json(Path(directory) / f"{name}.json", {"format": "orthodiff-state", "state": tree})
    return files


def load_state(directory: Path, name: str):
    """The state saved by ``save_state`` (tensors on the CPU); ValueError when a file is unreadable."""
    from safetensors.torch import load_file

    directory = Path(directory)
    data = json.loads((directory / f"{name}.json").read_text())
    if not isinstance(data, dict) or data.get("format") != "orthodiff-state":
        raise ValueError(f"{name}.json is not an orthodiff state file")
    tensor_path = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    return _decode(data["state"], tensors)


def _encode(value, tensors: dict, torch):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, torch)
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, torch) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, torch) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
            return {k: _encode(v, tensors, torch) for k, v in value.items()}
        return {_DICT: [[_encode(k, tensors, torch), _encode(v, tensors, torch)] for k, v in value.items()]}
    raise TypeError(f"cannot save a {type(value).__name__} in a training state")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        return np.asarray(value[_ARRAY], dtype=np.dtype(value["dtype"]))
    if _FLOAT in value:
        return float(value[_FLOAT])
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _DICT in value:
        return {_key(_decode(k, tensors)): _decode(v, tensors) for k, v in value[_DICT]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _key(key):
    return tuple(key) if isinstance(key, list) else key
