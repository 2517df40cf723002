"""What one bench run returns: its rows, how many were computed now, the headline lines for the
terminal and the files it wrote. A module of its own, so that the benches and the package that
dispatches to them import it one way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchResult:
    name: str
    out: Path
    rows: list = field(default_factory=list)
    computed: int = 0  # cells run now (the rest came from results.json)
    headline: list = field(default_factory=list)  # lines for the terminal
    files: list = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [(f"bench {self.name}: {len(self.rows)} cells ({self.computed} computed now, "
                 f"{len(self.rows) - self.computed} resumed from results.json) in {self.seconds:.0f} s")]
        lines += self.headline
        lines.append("wrote " + ", ".join(str(p) for p in self.files))
        return "\n".join(lines)
