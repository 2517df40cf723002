"""Is a series a diagnostic volume? Localizers, scouts and derived images are not.

A clinical exam always holds a localizer (often three planes in one series, a few thick slices
each) and often reformats, MIPs or screenshots. They look like volumes to a reader, so they are
judged here and listed in the errors file with the reason, never used. A user can keep
localizers on purpose (``--keep-localizers``) or keep named series (a keep list).
"""

from __future__ import annotations

import re

# Knee diagnostic series have 3-5 mm slices and 15 or more of them; scouts have a few at 5-10 mm.
LOCALIZER_MAX_SLICES = 12
LOCALIZER_MIN_STEP_MM = 6.0
DERIVED_IMAGE_TYPES = frozenset({"DERIVED", "SECONDARY", "MPR", "MIP", "MINIP", "PROJECTION IMAGE", "REFORMATTED", "SCREEN SAVE", "CSA RESAMPLED"})
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture SOP classes (screenshots)
_DERIVED_WORDS = re.compile(r"\b(?:mpr|mip|minip|reformat\w*|screen ?shot|screen save|3d render\w*|vr)\b")
_LOCALIZER_WORDS = re.compile(r"\b(?:loc|localizer|localiser|scout|survey|3 ?pl(?:ane)?|tripilot|aahead|planning)\b")


def localizer_reason(image_type, description: str, n_slices: int, step_mm: float, part_count: int) -> str | None:
    """Why a volume is a localizer or scout, or None.

    ImageType LOCALIZER; one of several slice orientations of one series that is not a full stack
    (fewer than 12 slices or slices 6 mm or more apart); or, in any series, 12 slices or fewer at
    6 mm or more (a scout's few widely spaced slices). A description such as "Loc" or "Scout"
    alone is not enough: it only sharpens the message.
    """
    image_type = {str(value).upper() for value in image_type or ()}
    named = " (described as a localizer)" if _LOCALIZER_WORDS.search(_words(description)) else ""
    if "LOCALIZER" in image_type:
        return "a localizer (ImageType LOCALIZER)"
    few, wide = n_slices <= LOCALIZER_MAX_SLICES, step_mm >= LOCALIZER_MIN_STEP_MM
    if part_count > 1 and (few or wide):
        return (
            f"one of {part_count} slice orientations in one series, {n_slices} slices {step_mm:.1f} mm apart: "
            f"a multi-plane localizer{named}"
        )
    if few and wide:
        return f"a scout: only {n_slices} slices {step_mm:.1f} mm apart{named}"
    return None


def derived_reason(image_type, sop_class: str, description: str) -> str | None:
    """Why a series is derived or secondary (reformat, MIP, screenshot), or None."""
    values = [str(value).upper() for value in image_type or ()]
    hits = [value for value in values if value in DERIVED_IMAGE_TYPES]
    if hits:
        return f"a derived or secondary image (ImageType {'/'.join(values)})"
    if str(sop_class).startswith(SECONDARY_CAPTURE_PREFIX):
        return "a secondary capture (screenshot), not an acquired image"
    match = _DERIVED_WORDS.search(_words(description))
    if match:
        return f"a derived image (description says {match.group(0)!r})"
    return None


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(text or "").lower()).strip()
