"""Where a training or validation curve stood over the last quarter of its steps: every "has it
settled?" verdict of the bench reports reads its curve here."""

from __future__ import annotations

# A validation curve counts as flat when its last quarter gained less than this (Dice or AUROC).
FLAT_VALIDATION_GAIN = 0.005


def last_quarter(points, minimum: int = 3) -> tuple[float, float] | None:
    """(value at the start of the last quarter of a curve's steps, last value) for a curve
    [(step, value), ...]: the start is the last point at or before 3/4 of the last step. None with fewer
    than ``minimum`` points. Every "last quarter" verdict of the reports reads its curve here."""
    if not points or len(points) < minimum:
        return None
    last_step, last = points[-1]
    earlier = [value for step, value in points if step <= 0.75 * last_step]
    return (float(earlier[-1]), float(last)) if earlier else None


def last_quarter_gain(curve) -> float | None:
    """What a validation curve gained over the last quarter of its steps (None: fewer than 4 points)."""
    found = last_quarter(curve, minimum=4)
    return None if found is None else found[1] - found[0]


__all__ = ["FLAT_VALIDATION_GAIN", "last_quarter", "last_quarter_gain"]
