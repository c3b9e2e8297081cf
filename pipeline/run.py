"""The generation job: prompt shards (Parquet or JSON Lines) in, completions out.

  python -m pipeline.run --input 'prompts/*.parquet' --output out/ --model_dir models/gpt2 [options] [Beam options]

Checks what it can before any work (inputs match, model directory intact, options known), runs the Beam
pipeline while logging its progress, then writes DIR/run_report.json with the row accounting read from the files
written. The scoring job (pipeline/score.py) is run by the same code (`run_job` with its `Job`): only its transform,
its output directory and its token column differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import time
from typing import Callable, NoReturn

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from lmgraph import show_tensorflow_logs
from lmgraph.manifest import ModelError, model_label
from pipeline import progress
from pipeline.options import UsageError, max_batch_tokens, parse, sampling
from transforms.job import GenerateCompletions, JobConfig
from transforms.model_cache import check_model_dir
from transforms.progress import PROGRESS_DIR_ENV, ROWS_SKIPPED, TOKENS, close_local_totals
from transforms.read import count_rows, has_column, shard_name, unreadable_id
from transforms.records import NUM_SAMPLES
from transforms.write import errors_path, output_path, read_columns

log = logging.getLogger("pipeline.run")  # not __name__: that is "__main__" under `python -m`
OUR_LOGGERS = ("pipeline", "transforms", "lmgraph")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# Runners whose workers run on this machine, where the launcher reads progress from the workers' files.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "BundleBasedDirectRunner")


def configure_logging(level: str) -> None:
    """Our loggers from `level`; Beam's, TensorFlow's and everyone else's from WARNING (from INFO with DEBUG, and
    TensorFlow's C++ start-up lines only then)."""
    if level == "DEBUG":
        show_tensorflow_logs()
    logging.basicConfig(format=LOG_FORMAT, force=True)
    logging.getLogger().setLevel(logging.INFO if level == "DEBUG" else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


def absolute(path: str) -> str:
    """A local path made absolute: workers (a portable runner's worker pool, Flink task managers) run in
    other directories than the one the job was launched from. Paths with a scheme (gs://) are unchanged."""
    return os.path.abspath(path) if FileSystems.get_scheme(path) is None else path


def match(patterns: list[str]) -> list[str]:
    return sorted(m.path for r in FileSystems.match(patterns) for m in r.metadata_list)


def match_inputs(pattern: str) -> list[str]:
    try:
        paths = match([pattern])
    except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError for a bad pattern or bucket
        raise UsageError(f"--input {pattern!r}: {e}") from None
    if not paths:
        raise UsageError(f"--input {pattern!r} matches no files")
    names = [shard_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"input shards share file names {dupes}: each shard's output is named after it")
    return paths


@dataclasses.dataclass(frozen=True)
class Job:
    """What differs between the generation job and the scoring job; the rest of `run_job` is theirs alike.

    transform(args, manifest, model label, done files, paths) -> the PTransform from input paths to written ones.
    """
    kind: str  # the output rows' directory in DIR: completions or scores
    tokens_column: str  # the output files' column of each row's tokens
    tokens: str  # the report's key and the progress counter of those tokens
    transform: Callable


def input_rows(path: str) -> int | None:
    """Rows in an input shard, or None if it cannot be read (the pipeline dead-letters it)."""
    try:
        return count_rows(path)
    except Exception:  # noqa: BLE001 - any unreadable shard
        return None


def build_report(paths: list[str], rows: dict[str, int | None], output: str, args, wall: float, model: str,
                 skipped: list[str], skipped_rows: int | None, job: Job | None = None) -> dict:
    """Rows read come from the input files (counted before the run), rows written and dead-lettered from the files
    written: the accounting checks the pipeline rather than echoing it. Rows skipped as done (--skip_existing)
    come from the job's counter (None if the runner reports no metrics).

    rows_written counts output rows (a row's samples each); rows_completed the input rows among them (their ids:
    the writer writes a row whole, all its samples, or not at all), which is what the accounting adds up."""
    job = job or GENERATE_JOB
    fmt = args.output_format
    read = written = completed = dead = tokens = 0
    unreadable, precisions = [], set()
    for p in paths:
        ids = read_columns(errors_path(output, p, fmt), ["id"])["id"]
        if unreadable_id(p) in ids:  # one dead letter for a shard that could not be read: no rows to count
            unreadable.append(p)
            dead += len(ids) - 1
            continue
        read += rows[p] if rows[p] is not None else count_rows(p)
        dead += len(ids)
        table = read_columns(output_path(output, job.kind, p, fmt), ["id", job.tokens_column, "precision"])
        written += len(table["id"])
        completed += len(set(table["id"]))
        tokens += sum(table[job.tokens_column])
        precisions.update(table["precision"])
    return {
        "rows_read": read, "rows_written": written, "rows_completed": completed, "rows_dead_lettered": dead,
        "rows_skipped_existing": skipped_rows,
        "accounted": skipped_rows is not None and read == completed + dead + skipped_rows,
        "unreadable_shards": unreadable, "shards": len(paths), "shards_skipped_existing": skipped,
        job.tokens: tokens, "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 2) if wall else None,
        "model": model, "precision": sorted(precisions), "options": vars(args),
    }


def is_done(output: str, path: str, output_format: str, kind: str = "completions") -> bool:
    """Both output files of a shard exist: each is renamed into place only when complete."""
    return (FileSystems.exists(output_path(output, kind, path, output_format))
            and FileSystems.exists(errors_path(output, path, output_format)))


def done_files(output: str, paths: list[str], output_format: str, kind: str = "completions") -> list[str]:
    """The output files earlier runs left in DIR (completions, or scores, and errors, either format), except those
    this run writes anew: the ids in them are done."""
    ours = {output_path(output, sub, p, output_format) for p in paths for sub in (kind, "errors")}
    found = match([FileSystems.join(output, sub, f"*.{ext}") for sub in (kind, "errors")
                   for ext in ("parquet", "jsonl")])
    return [f for f in found if f not in ours]


def clear_tmp(output: str) -> None:
    """Remove what killed runs left in DIR/.tmp/ (never read: each write uses a fresh temporary name)."""
    leftovers = match([FileSystems.join(output, ".tmp", "*")])
    if leftovers:
        FileSystems.delete(leftovers)


def local_runner(options: PipelineOptions):
    """The runner the DirectRunner picks for a batch pipeline like this one, the in-process FnApiRunner (with the
    pipeline options for its workers, as the DirectRunner passes them), without the DirectRunner's first attempt:
    Prism, a binary it first downloads from GitHub, which offline fails after a page of log lines."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """os.environ[name] = value (unset for None) within the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_pipeline(paths: list[str], transform: beam.PTransform, options: PipelineOptions, total: int,
                 progress_seconds: float, tokens_counter: str = TOKENS) -> dict[str, int] | None:
    """Run the job, logging progress meanwhile; return its counters (None if the runner reports no metrics)."""
    runner = options.view_as(StandardOptions).runner
    local = runner is None or runner.rsplit(".", 1)[-1] in LOCAL_RUNNERS
    p = beam.Pipeline(runner=local_runner(options) if runner is None else None, options=options)
    _ = p | "Inputs" >> beam.Create(paths) | "Generate" >> transform
    with contextlib.ExitStack() as stack:
        if local:  # the workers keep their counters in files here too (transforms/progress.py)
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2-beam-progress-"))
            stack.callback(close_local_totals)  # before the directory goes: no write from this process after
            counts = functools.partial(progress.read_totals, directory)
        else:
            directory, counts = None, progress.MetricCounts()
        stack.enter_context(environment(PROGRESS_DIR_ENV, directory))
        stack.enter_context(progress.Reporter(total, progress_seconds, counts, tokens_counter))
        result = p.run()
        if not local:
            counts.result = result
        result.wait_until_finish()
    return progress.counter_values(result)


def generation(args, manifest: dict, model: str, done: tuple[str, ...], paths: list[str]) -> beam.PTransform:
    """The generation job's transform. Completions get `sample` when --num_samples is given or an input shard this
    run reads has a num_samples column (a JSON Lines shard: some line has the key)."""
    samples = args.num_samples is not None or any(has_column(p, NUM_SAMPLES) for p in paths)
    return GenerateCompletions(JobConfig(
        output_dir=args.output, model_dir=args.model_dir, model_label=model, n_ctx=manifest["config"]["n_ctx"],
        defaults=sampling(args),
        seed=args.seed, stops=tuple(args.stop), truncate=args.truncate, prompt_column=args.prompt_column,
        messages_column=args.messages_column,
        id_column=args.id_column, batch_size=args.batch_size, max_batch_tokens=max_batch_tokens(args, manifest),
        run_seconds=args.run_seconds, precision=args.precision, intra_op_threads=args.intra_op_threads,
        output_format=args.output_format,
        logprobs=args.logprobs, num_samples=args.num_samples or 1, samples=samples, done_files=done))


GENERATE_JOB = Job("completions", "completion_tokens", TOKENS, generation)


def run(argv: list[str]) -> dict:
    args, options = parse(argv)
    return run_job(args, options)


def run_job(args, options: PipelineOptions, job: Job = GENERATE_JOB) -> dict:
    args.input, args.output, args.model_dir = map(absolute, (args.input, args.output, args.model_dir))
    start = time.time()
    paths = match_inputs(args.input)
    manifest = check_model_dir(args.model_dir)
    model = model_label(manifest)
    fmt = args.output_format
    skipped = []
    if args.skip_existing:
        skipped = [p for p in paths if is_done(args.output, p, fmt, job.kind)]
        paths = [p for p in paths if p not in skipped]
    done = tuple(done_files(args.output, paths, fmt, job.kind) if args.skip_existing else ())
    transform = job.transform(args, manifest, model, done, paths)
    for sub in (job.kind, "errors", ".tmp"):
        if not FileSystems.exists(FileSystems.join(args.output, sub)):
            try:
                FileSystems.mkdirs(FileSystems.join(args.output, sub))
            except Exception as e:  # noqa: BLE001 - e.g. a file in the way, or no permission
                raise UsageError(f"--output {args.output!r}: cannot create {sub}/: {e}") from None
    rows = {p: input_rows(p) for p in paths}
    total = sum(n for n in rows.values() if n)
    log.info("model %s, precision %s; %d shard(s) to do (%d rows), %d skipped as done", model, args.precision,
             len(paths), total, len(skipped))
    skipped_rows = 0
    if paths:
        counters = run_pipeline(paths, transform, options, total, args.progress_seconds, job.tokens)
        if done:
            skipped_rows = None if counters is None else counters.get(ROWS_SKIPPED, 0)
    clear_tmp(args.output)
    report = build_report(paths, rows, args.output, args, time.time() - start, model, skipped, skipped_rows, job)
    with FileSystems.create(FileSystems.join(args.output, "run_report.json")) as f:
        f.write(json.dumps(report, indent=2).encode())
    samples = f" ({report['rows_written']} {job.kind})" if report["rows_written"] != report["rows_completed"] else ""
    log.info("done: %d rows read, %d written%s, %d dead-lettered, %s skipped as done; %d %s in %.1f s "
             "(%.1f tokens/s), precision %s", report["rows_read"], report["rows_completed"], samples,
             report["rows_dead_lettered"], "?" if skipped_rows is None else skipped_rows,
             report[job.tokens], job.tokens.replace("_", " "), report["wall_seconds"],
             report["tokens_per_second"] or 0, "/".join(report["precision"]) or "-")
    return report


def main(argv: list[str] | None = None, parse_argv: Callable = parse, job: Job = GENERATE_JOB) -> int:
    """The command line of a job (this one's by default; pipeline.score gives its own parser and Job)."""
    try:
        args, options = parse_argv(sys.argv[1:] if argv is None else argv)
        configure_logging(args.log_level)
        report = run_job(args, options, job)
    except (UsageError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report["accounted"] and not report["unreadable_shards"] else 1


def exit_process(code: int) -> NoReturn:
    """Exit with the job's code once its output and report are written, skipping Python's shutdown: threads that
    Beam's runners leave behind (the PortableRunner's gRPC streams to its job service) can abort it after a job
    that succeeded ("terminate called without an active exception", exit -6), and waiting on them delays the exit
    by seconds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
