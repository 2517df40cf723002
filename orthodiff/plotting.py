"""Matplotlib for files only: the Agg backend, and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

from .fileio import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path
