"""Write a few small Parquet shards of sample prompts (for the demo and the benchmark).

  python -m pipeline.sample_data --output data/sample_prompts [--shards 3] [--rows 8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "The history of the printing press begins", "Here is a recipe for a simple tomato soup:",
    "In a distant galaxy, a small robot", "The three most important ideas in economics are",
    "Dear diary, today I finally", "def fibonacci(n):", "Once upon a time, in a village by the sea,",
    "The weather forecast for tomorrow says", "Ladies and gentlemen, welcome to", "To be, or not to be:",
    "A haiku about autumn leaves:", "The quickest way to learn a new language is",
    "Breaking news: scientists have discovered", "My favourite thing about winter is",
    "Q: What is the capital of France?\nA:", "The following is a conversation between two friends.",
]


def write_shards(output: str | Path, shards: int = 3, rows: int = 8) -> list[Path]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        texts = [PROMPTS[(s * rows + i) % len(PROMPTS)] for i in range(rows)]
        ids = [f"sample-{s}-{i}" for i in range(rows)]
        path = out / f"prompts-{s:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "prompt": texts}), path)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--rows", type=int, default=8)
    a = p.parse_args()
    for path in write_shards(a.output, a.shards, a.rows):
        print(path)


if __name__ == "__main__":
    main()
