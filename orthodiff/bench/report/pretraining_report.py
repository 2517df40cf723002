"""The bench report's pretraining section: the held-out denoising loss of each plane's denoiser
against its steps, read from the cached pretraining's ``<plane>/metrics.jsonl``, as a table, a
picture and a one-line verdict on whether the curve has flattened."""

from __future__ import annotations

from pathlib import Path

from ...fileio import safe_filename
from ...planes import PLANES
from ...plotting import pyplot, save_png
from .curves import last_quarter

# The curve counts as flat when its last quarter lowered the held-out loss by less than this share.
FLAT_CHANGE = 0.05


def heldout_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{plane: [(step, held-out loss), ...]} for the planes that logged one."""
    from ...training.tracking import read_metrics

    curves = {}
    for plane in PLANES:
        path = Path(folder) / plane / "metrics.jsonl"
        if path.exists():
            points = [(int(r["step"]), float(r["heldout_loss"])) for r in read_metrics(path) if "heldout_loss" in r]
            if points:
                curves[plane] = sorted(points)
    return curves


def last_quarter_change(points: list[tuple[int, float]]) -> float | None:
    """Relative drop of the held-out loss over the last quarter of the steps (None: too few points)."""
    found = last_quarter(points)
    if found is None or found[0] <= 0:
        return None
    start, last = found
    return (start - last) / start


def pretraining_section(folder: Path | None, out: Path, name: str = "") -> tuple[list[str], Path | None]:
    """Report lines and the picture (``<out>/pretraining_heldout_loss[_<name>].png``) of the cached
    pretraining in ``folder``; a line saying it was not measured when no plane logged a held-out loss.
    ``name`` tells apart the pretrainings of one report (a robustness scenario, a joint)."""
    if not folder:
        return [], None
    curves = heldout_curves(Path(folder))
    lines = [f"## Pretraining{f' ({name})' if name else ''}: held-out denoising loss", ""]
    if not curves:
        return lines + ["No held-out loss was logged (pretrain.eval_every=0): convergence of pretraining is "
                        "not shown.", ""], None
    steps = sorted({step for points in curves.values() for step, _ in points})
    planes = list(curves)
    lines += [("Denoising loss of the exported (EMA) weights on pool patients that pretraining never saw, "
               "at fixed timesteps and noise."), "",
              "| step | " + " | ".join(planes) + " |", "|---|" + "---|" * len(planes)]
    for step in steps:
        values = [dict(curves[p]).get(step) for p in planes]
        lines.append(f"| {step} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    verdicts = []
    for plane in planes:
        change = last_quarter_change(curves[plane])
        if change is None:
            verdicts.append(f"{plane}: too few points to tell")
        else:
            state = "flat" if change < FLAT_CHANGE else "still falling"
            verdicts.append(f"{plane} {state} ({change:+.1%} over the last quarter of the steps)")
    lines += ["", f"Last quarter (flat: a drop under {FLAT_CHANGE:.0%}): " + "; ".join(verdicts) + ".", ""]
    stem = "pretraining_heldout_loss" + (f"_{safe_filename(name)}" if name else "")
    return lines, _plot(curves, Path(out) / f"{stem}.png")


def _plot(curves: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for plane, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", label=plane)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("held-out denoising loss")
    ax.set_title("Pretraining on the unlabeled archive", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


__all__ = ["FLAT_CHANGE", "heldout_curves", "last_quarter_change", "pretraining_section"]
