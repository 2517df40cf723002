"""Reading scans with their geometry."""

from .volume import Volume, read_volume

__all__ = ["Volume", "read_volume"]
