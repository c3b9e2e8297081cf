"""The generation job: Parquet prompts in, completions out.

  python -m pipeline.run --input 'prompts/*.parquet' --output out/ --model_dir models/gpt2 [options] [Beam options]

Checks what it can before any work (inputs match, model directory intact, options known), runs the Beam
pipeline, then writes DIR/run_report.json with the row accounting read from the files written.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from gpt2.manifest import ModelError, model_label
from pipeline.options import UsageError, parse, sampling
from transforms.job import GenerateCompletions, JobConfig
from transforms.model_cache import check_model_dir
from transforms.read import open_parquet, shard_name, unreadable_id
from transforms.write import completions_path, errors_path


def absolute(path: str) -> str:
    """A local path made absolute: workers (a portable runner's worker pool, Flink task managers) run in
    other directories than the one the job was launched from. Paths with a scheme (gs://) are unchanged."""
    return os.path.abspath(path) if FileSystems.get_scheme(path) is None else path


def match_inputs(pattern: str) -> list[str]:
    try:
        paths = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError for a bad pattern or bucket
        raise UsageError(f"--input {pattern!r}: {e}") from None
    if not paths:
        raise UsageError(f"--input {pattern!r} matches no files")
    names = [shard_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"input shards share file names {dupes}: each shard's output is named after it")
    return paths


def build_report(paths: list[str], output: str, args, wall: float, model: str, skipped: list[str]) -> dict:
    """Rows read come from the input files' metadata, rows written and dead-lettered from the files written:
    the accounting checks the pipeline rather than echoing it."""
    read = written = dead = tokens = 0
    unreadable, precisions = [], set()
    for p in paths:
        ids = pq.read_table(FileSystems.open(errors_path(output, p)), columns=["id"]).column(0).to_pylist()
        if unreadable_id(p) in ids:  # one dead letter for a shard that could not be read: no rows to count
            unreadable.append(p)
            dead += len(ids) - 1
            continue
        read += open_parquet(p).metadata.num_rows
        dead += len(ids)
        table = pq.read_table(FileSystems.open(completions_path(output, p)), columns=["completion_tokens", "precision"])
        written += table.num_rows
        tokens += sum(table.column(0).to_pylist())
        precisions.update(table.column(1).unique().to_pylist())
    return {
        "rows_read": read, "rows_written": written, "rows_dead_lettered": dead,
        "accounted": read == written + dead, "unreadable_shards": unreadable,
        "shards": len(paths), "shards_skipped_existing": skipped,
        "generated_tokens": tokens, "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 2) if wall else None,
        "model": model, "precision": sorted(precisions), "options": vars(args),
    }


def is_done(output: str, path: str) -> bool:
    """Both output files of a shard exist: each is renamed into place only when complete."""
    return FileSystems.exists(completions_path(output, path)) and FileSystems.exists(errors_path(output, path))


def clear_tmp(output: str) -> None:
    """Remove what killed runs left in DIR/.tmp/ (never read: each write uses a fresh temporary name)."""
    leftovers = [m.path for r in FileSystems.match([FileSystems.join(output, ".tmp", "*")]) for m in r.metadata_list]
    if leftovers:
        FileSystems.delete(leftovers)


def run(argv: list[str]) -> dict:
    args, options = parse(argv)
    args.input, args.output, args.model_dir = map(absolute, (args.input, args.output, args.model_dir))
    start = time.time()
    paths = match_inputs(args.input)
    manifest = check_model_dir(args.model_dir)
    model = model_label(manifest)
    skipped = []
    if args.skip_existing:
        skipped = [p for p in paths if is_done(args.output, p)]
        paths = [p for p in paths if p not in skipped]
    for sub in ("completions", "errors", ".tmp"):
        if not FileSystems.exists(FileSystems.join(args.output, sub)):
            try:
                FileSystems.mkdirs(FileSystems.join(args.output, sub))
            except Exception as e:  # noqa: BLE001 - e.g. a file in the way, or no permission
                raise UsageError(f"--output {args.output!r}: cannot create {sub}/: {e}") from None
    config = JobConfig(
        output_dir=args.output, model_dir=args.model_dir, model_label=model, n_ctx=manifest["config"]["n_ctx"],
        defaults=sampling(args),
        seed=args.seed, stops=tuple(args.stop), truncate=args.truncate, prompt_column=args.prompt_column,
        id_column=args.id_column, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        precision=args.precision, intra_op_threads=args.intra_op_threads)
    logging.info("%d shard(s) to do, %d skipped as done; model %s", len(paths), len(skipped), model)
    if paths:
        with beam.Pipeline(options=options) as p:
            _ = p | "Inputs" >> beam.Create(paths) | "Generate" >> GenerateCompletions(config)
    clear_tmp(args.output)
    report = build_report(paths, args.output, args, time.time() - start, model, skipped)
    with FileSystems.create(FileSystems.join(args.output, "run_report.json")) as f:
        f.write(json.dumps(report, indent=2).encode())
    logging.info("done: %d rows read, %d written, %d dead-lettered, %d tokens in %.1f s (%.1f tokens/s), precision %s",
                 report["rows_read"], report["rows_written"], report["rows_dead_lettered"],
                 report["generated_tokens"], report["wall_seconds"], report["tokens_per_second"] or 0,
                 "/".join(report["precision"]) or "-")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    try:
        report = run(sys.argv[1:] if argv is None else argv)
    except (UsageError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report["accounted"] and not report["unreadable_shards"] else 1


if __name__ == "__main__":
    sys.exit(main())
