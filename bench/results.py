"""BENCHMARKS.md's generated tables: each benchmark owns the text between its pair of markers."""
from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "BENCHMARKS.md"


def write_between(text: str, markers: tuple[str, str], path: Path = BENCHMARKS) -> None:
    """Replace what is between `markers` in path; append the markers at the end if missing."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if markers[0] not in doc:
        doc = f"{doc.rstrip()}\n\n{markers[0]}\n{markers[1]}\n"
    head, rest = doc.split(markers[0], 1)
    _, tail = rest.split(markers[1], 1)
    path.write_text(f"{head}{markers[0]}\n{text}\n{markers[1]}{tail}")
