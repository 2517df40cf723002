"""File and folder names for ids (study ids, series ids, labels) that may hold any character.

Names are injective: an id that is already a plain name is kept as it is; any other id is
cleaned and gets a short hash of the original, so "a b", "a?b" and "a_b" never share a file.
Long ids are shortened (with the hash) to stay well inside the 255-byte file-name limit.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM = 120  # characters kept before the hash; leaves room for prefixes and suffixes


def safe_name(name, fallback: str = "item") -> str:
    """A file or folder name for ``name``; different names always give different results."""
    text = str(name)
    cleaned = _UNSAFE.sub("_", text).strip("._")
    if text and cleaned == text and len(text) <= MAX_STEM:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[:MAX_STEM] or fallback}-{digest}"
