"""A small folder in MRNet's own layout: ``train/`` and ``valid/`` with one uint8 ``(slices, side, side)``
``.npy`` per plane and exam (slice counts varying per exam, as in the real data), and the label CSVs
``{train,valid}-{abnormal,acl,meniscus}.csv`` as MRNet ships them (rows "exam,0|1", no header)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orthodiff.planes import PLANES

MRNET_LABELS = ("abnormal", "acl", "meniscus")
FIRST_VALID_EXAM = 1130  # MRNet numbers its valid exams on from its last train exam


def mrnet_exams(train: int, valid: int) -> dict[str, list[int]]:
    """Exam numbers per split."""
    return {"train": list(range(train)), "valid": list(range(FIRST_VALID_EXAM, FIRST_VALID_EXAM + valid))}


def mrnet_label(name: str, position: int) -> int:
    """0/1 per label, alternating with a different period per label so each split holds both classes
    of each (and the labels are not copies of one another)."""
    period = {"abnormal": 2, "acl": 3, "meniscus": 4}[name]
    return int(position % period == 0)


def write_mrnet_archive(root: Path, train: int = 24, valid: int = 8, side: int = 32, seed: int = 0) -> Path:
    """Write ``train`` and ``valid`` exams under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, exams in mrnet_exams(train, valid).items():
        for plane in PLANES:
            folder = root / split / plane
            folder.mkdir(parents=True, exist_ok=True)
            for exam in exams:
                slices = int(rng.integers(5, 9))
                np.save(folder / f"{exam:04d}.npy", rng.integers(0, 256, size=(slices, side, side), dtype=np.uint8))
        for name in MRNET_LABELS:
            rows = [f"{exam:04d},{mrnet_label(name, position)}\n" for position, exam in enumerate(exams)]
            (root / f"{split}-{name}.csv").write_text("".join(rows))
    return root
