"""Command-line options of the generation job; anything else is passed to Beam as pipeline options."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging

from apache_beam.options.pipeline_options import PipelineOptions

from gpt2.sampling import FIELDS, HELP, TYPES, SamplingParams
from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A sampling field's help, where the run's option means more than the field (the run seed).
OPTION_HELP = {"seed": "run seed; a row's seed derives from it and the row id"}


class UsageError(ValueError):
    """A mistake in how the job was invoked: reported as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse would print the usage and exit; we want our one-line message and exit code 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline.run",
        description="Batch text generation with GPT-2 (frozen TF graph) on Apache Beam. "
                    "Options not listed here are Beam pipeline options (--runner, --direct_num_workers, ...).")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True,
                    help="glob of prompt shards, local or gs://: Parquet, or JSON Lines (names ending in .jsonl)")
    io.add_argument("--output", required=True, help="output directory: completions/, errors/, run_report.json")
    io.add_argument("--output_format", choices=["parquet", "jsonl"], default="parquet",
                    help="completions and errors files as Parquet or JSON Lines (the same fields)")
    io.add_argument("--model_dir", required=True, help="model directory written by `python -m pipeline.export`")
    io.add_argument("--prompt_column", default="prompt")
    io.add_argument("--id_column", default="id",
                    help="when absent or null, a row's id is <shard name>:<row> (Parquet, from 0) or "
                         "<shard name>:<line> (JSON Lines, from 1)")
    io.add_argument("--skip_existing", action="store_true",
                    help="skip input shards whose completions and errors files already exist, and rows whose id "
                         "already has an output row in --output (incremental runs and re-runs)")
    io.add_argument("--logprobs", action="store_true",
                    help="completions get `logprobs`: each token's log-probability under the model")
    s = p.add_argument_group("sampling (per-row columns of the same names override these)")
    for name in FIELDS:  # gpt2.sampling.SamplingParams: one option per field, its default and type
        help = OPTION_HELP.get(name, HELP[name])
        if TYPES[name] is bool:
            s.add_argument(f"--{name}", action="store_true", help=help)
        else:
            s.add_argument(f"--{name}", type=TYPES[name], default=getattr(SamplingParams, name), help=help)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable), applied after decoding")
    s.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="left: keep the end of prompts that do not fit the context instead of rejecting them")
    b = p.add_argument_group("batching and workers")
    b.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per generation batch at most")
    b.add_argument("--max_batch_tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="rows x (longest prompt + max_new_tokens) per batch at most")
    b.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: the fastest the worker's device has (bfloat16 on CPUs with AMX or AVX512-BF16 and "
                        "on Ampere GPUs, float16 on older GPUs, else float32); each row records the one used")
    b.add_argument("--intra_op_threads", type=int, default=None,
                   help="TensorFlow threads per worker process (default: all cores)")
    c = p.add_argument_group("console")
    c.add_argument("--progress_seconds", type=float, default=30.0,
                   help="a progress line (rows done of the total, tokens/s, ETA) every this many seconds; 0: none")
    c.add_argument("--log_level", choices=LOG_LEVELS, default="INFO",
                   help="the job's own log lines from this level; Beam's and other libraries' from WARNING, or "
                        "from INFO with DEBUG")
    return p


def sampling(args: argparse.Namespace) -> SamplingParams:
    """The run's sampling defaults from the options (seed: the run seed)."""
    return SamplingParams(**{name: getattr(args, name) for name in FIELDS})


def parse(argv: list[str]) -> tuple[argparse.Namespace, PipelineOptions]:
    args, beam_args = build_parser().parse_known_args(argv)
    for name in ("max_new_tokens", "batch_size", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.intra_op_threads is not None and args.intra_op_threads < 1:
        raise UsageError(f"--intra_op_threads must be >= 1, got {args.intra_op_threads}")
    if not args.progress_seconds >= 0:
        raise UsageError(f"--progress_seconds must be >= 0, got {args.progress_seconds}")
    try:
        sampling(args).validate()
    except ValueError as e:  # "top_p must be in (0, 1], got 1.5"
        raise UsageError(f"--{e}") from None
    options = PipelineOptions(beam_args)
    stderr, beam_log = io.StringIO(), logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    try:  # quietly: Beam's parser prints its whole usage on a bad value and logs the unknown options
        beam_log.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(stderr):
            known = options.get_all_options(retain_unknown_options=False)
    except SystemExit:
        raise UsageError(stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]) from None
    finally:
        beam_log.setLevel(level)
    unknown = [a for a in beam_args if a.startswith("--") and a[2:].split("=")[0] not in known]
    if unknown:
        raise UsageError(f"unknown option(s): {' '.join(unknown)} (see python -m pipeline.run --help)")
    return args, options
