"""Which features each plane reads, and how several of them become one map.

A *selection* is ``{plane: ["block@spec", ...]}``: the (block, timestep spec) pairs a plane's head
reads, best first (``"up0@25"``, ``"mid@50+100"`` for features averaged over timesteps). With more
than one pair, the maps are resized to the grid of the first and their channels concatenated, so a
head sees one (C, d, h, w) map per plane whichever blocks it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import OrthodiffError


def key_name(block: str, spec: str) -> str:
    return f"{block}@{spec}"


def parse_key(name: str) -> tuple[str, str]:
    """'up0@25' -> ('up0', '25')."""
    block, sep, spec = str(name).partition("@")
    if not sep or not block or not spec:
        raise OrthodiffError(f"feature selection: {name!r} is not 'block@timestep' (e.g. 'mid@100' or 'up0@50+100')")
    return block, spec


def spec_timesteps(spec: str) -> list[int]:
    """'100' -> [100]; '50+100' (averaged over timesteps) -> [50, 100]."""
    try:
        return [int(part) for part in str(spec).split("+")]
    except ValueError:
        raise OrthodiffError(f"feature selection: timestep {spec!r} is not a number or 'a+b' list") from None


def plane_sampling(keys: Sequence[str]) -> tuple[list[int], list[str], bool]:
    """(timesteps, blocks, average_timesteps) that a FeatureExtractor needs to reproduce ``keys``.

    Noise depends on (seed, study, plane, draw) only, so extracting a subset of a store's
    timesteps or blocks gives the stored numbers.
    """
    parsed = [parse_key(key) for key in keys]
    if not parsed:
        raise OrthodiffError("feature selection: a plane reads no feature; name at least one 'block@timestep'")
    averaged = {spec for _, spec in parsed if "+" in spec}
    if averaged and len({spec for _, spec in parsed}) > 1:
        raise OrthodiffError(f"feature selection {list(keys)}: averaged timesteps cannot be mixed with other timesteps")
    blocks = list(dict.fromkeys(block for block, _ in parsed))
    timesteps = list(dict.fromkeys(t for _, spec in parsed for t in spec_timesteps(spec)))
    return timesteps, blocks, bool(averaged)


def composed_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """(C, d, h, w) of maps of ``shapes`` (each (C, d, h, w)) concatenated on the first one's grid."""
    if not shapes:
        raise OrthodiffError("feature selection: no feature map to compose")
    return (sum(int(shape[0]) for shape in shapes), *[int(v) for v in shapes[0][1:]])


def compose(maps: Sequence):
    """(B, sum C, d, h, w): each map resized to the first map's grid (area average when it
    shrinks in every axis, trilinear otherwise), channels concatenated in order."""
    import torch
    from torch.nn import functional as F

    if not maps:
        raise OrthodiffError("feature selection: no feature map to compose")
    if len(maps) == 1:
        return maps[0]
    size = tuple(maps[0].shape[2:])
    resized = []
    for value in maps:
        here = tuple(value.shape[2:])
        if here == size:
            resized.append(value)
        elif all(a >= b for a, b in zip(here, size)):
            resized.append(F.interpolate(value, size=size, mode="area"))
        else:
            resized.append(F.interpolate(value, size=size, mode="trilinear", align_corners=False))
    return torch.cat(resized, dim=1)


def compose_found(found: Mapping[tuple[str, str], object], keys: Sequence[str]):
    """The composed map of ``keys`` out of a FeatureExtractor result {(block, spec): map}."""
    return compose([found[parse_key(key)] for key in keys])


def selection_shape(denoiser, keys: Sequence[str]) -> tuple[int, ...]:
    """(C, d, h, w) of the composed map of ``keys`` for this denoiser."""
    return composed_shape([denoiser.feature_shape(parse_key(key)[0]) for key in keys])


def uniform_selection(planes: Sequence[str], keys: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """The same (block, spec) pairs for every plane."""
    return {plane: [key_name(block, spec) for block, spec in keys] for plane in planes}
