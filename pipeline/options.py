"""Command-line options of the generation job (`parse`) and of the scoring job (`parse_score`); anything else is
passed to Beam as pipeline options. The options both share (input and output, batching and workers, console) are
defined once."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging

from apache_beam.options.pipeline_options import PipelineOptions

from lmgraph.config import ModelConfig
from lmgraph.sampling import FIELDS, HELP, TYPES, SamplingParams
from pipeline.beam_version import WORKER_BEAM_VERSION, worker_beam_mismatch
from transforms.batching import DEFAULT_BATCH_SIZE, max_batch_tokens_for
from transforms.generate import PART_SECONDS
from transforms.records import MESSAGES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A sampling field's help, where the run's option means more than the field (the run seed).
OPTION_HELP = {"seed": "run seed; a row's seed derives from it and the row id"}


class UsageError(ValueError):
    """A mistake in how the job was invoked: reported as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse would print the usage and exit; we want our one-line message and exit code 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def _io_options(p: argparse.ArgumentParser, outputs: str) -> argparse._ArgumentGroup:
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True,
                    help="glob of input shards, local or gs://: Parquet, or JSON Lines (names ending in .jsonl)")
    io.add_argument("--output", required=True, help=f"output directory: {outputs}/, errors/, run_report.json")
    io.add_argument("--output_format", choices=["parquet", "jsonl"], default="parquet",
                    help=f"{outputs} and errors files as Parquet or JSON Lines (the same fields)")
    io.add_argument("--model_dir", required=True, help="model directory written by `python -m pipeline.export`")
    io.add_argument("--id_column", default="id",
                    help="when absent or null, a row's id is <shard name>:<row> (Parquet, from 0) or "
                         "<shard name>:<line> (JSON Lines, from 1)")
    io.add_argument("--skip_existing", action="store_true",
                    help=f"skip input shards whose {outputs} and errors files already exist, and rows whose id "
                         "already has an output row in --output (incremental runs and re-runs)")
    return io


def _worker_options(p: argparse.ArgumentParser, rows: str) -> None:
    b = p.add_argument_group("batching and workers")
    generating = rows == "rows"
    b.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="rows decoded at once at most: the slots of continuous batching (a row that ends frees its "
                        "slot for the next)" if generating else f"{rows} per batch at most")
    b.add_argument("--max_batch_tokens", type=int, default=None,
                   help=("slots x (longest prompt + max_new_tokens) at most: the KV cache's bound (a run may go 1/32 "
                          "over when that saves it a wave of decode)" if generating
                         else f"{rows} x (longest window) per batch at most") +
                   f" (default: by the model's size: {max_batch_tokens_for(12, 768, not generating)}"
                   f" at 124M, {max_batch_tokens_for(24, 1024)} at 355M, {max_batch_tokens_for(48, 1600)} at 1.5B)")
    b.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16", "int8"], default="auto",
                   help="auto: the fastest the worker's device has (bfloat16 on CPUs with AMX or AVX512-BF16 and "
                        "on Ampere GPUs, float16 on older GPUs, else float32); int8 (CPUs only) quantizes the weight "
                        "matrices (exact integer sums, batch-invariant), slightly less accurate, never chosen by "
                        "auto; each row records the one used")
    b.add_argument("--intra_op_threads", type=int, default=None,
                   help="cores generation uses per worker process (default: all it may run on); on a CPU a "
                        "batch runs as that many parts side by side (at 124M each op on one thread)")
    b.add_argument("--worker_beam_version", default=WORKER_BEAM_VERSION,
                   help="the Beam version in the workers' image or pool, which must be this launcher's (default: the "
                        f"locked {WORKER_BEAM_VERSION}, as this repository's Dockerfile installs); checked when a job "
                        "on a remote runner names its workers (--sdk_container_image, --environment_config)")
    if generating:
        b.add_argument("--run_seconds", type=float, default=PART_SECONDS,
                       help="seconds per Session.run: a worker decodes its rows in parts this long, each going on "
                            "where the last stopped; rows done and progress move this often")


def _console_options(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("console")
    c.add_argument("--progress_seconds", type=float, default=30.0,
                   help="a progress line (rows done of the total, tokens/s, ETA) every this many seconds; 0: none")
    c.add_argument("--log_level", choices=LOG_LEVELS, default="INFO",
                   help="the job's own log lines from this level; Beam's and other libraries' from WARNING, or "
                        "from INFO with DEBUG")


def _parser(prog: str, description: str) -> _Parser:
    return _Parser(prog=prog, description=f"{description} on Apache Beam. Options not listed here are Beam pipeline "
                                          "options (--runner, --direct_num_workers, ...).")


def build_parser() -> argparse.ArgumentParser:
    p = _parser("python -m pipeline.run", "Batch text generation with GPT-2 or a Llama-family model (one TensorFlow graph)")
    io = _io_options(p, "completions")
    io.add_argument("--prompt_column", default="prompt")
    io.add_argument("--messages_column", default=MESSAGES,
                    help="chat rows: a list of {role, content} (Parquet list<struct<role, content>>, a JSON array in "
                         "JSON Lines) given instead of a prompt, rendered with the model's chat template; the "
                         "completion's prompt is the rendered text")
    io.add_argument("--logprobs", action="store_true",
                    help="completions get `logprobs`: each token's log-probability under the model")
    s = p.add_argument_group("sampling (per-row columns of the same names override these)")
    for name in FIELDS:  # lmgraph.sampling.SamplingParams: one option per field, its default and type
        help = OPTION_HELP.get(name, HELP[name])
        if TYPES[name] is bool:
            s.add_argument(f"--{name}", action="store_true", help=help)
        else:
            s.add_argument(f"--{name}", type=TYPES[name], default=getattr(SamplingParams, name), help=help)
    s.add_argument("--num_samples", type=int, default=None,
                   help="completions per prompt (default 1), each with `sample` 0..N-1 and its own seed; given, or "
                        "with a num_samples column in the input, completions get a `sample` column")
    s.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable): a row ends as soon as its text holds one, cut before it")
    s.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="left: keep the end of prompts that do not fit the context instead of rejecting them")
    _worker_options(p, "rows")
    _console_options(p)
    return p


def build_score_parser() -> argparse.ArgumentParser:
    p = _parser("python -m pipeline.score",
                "Log-likelihood of given text under the model (the same model directory and graph)")
    io = _io_options(p, "scores")
    io.add_argument("--text_column", default=None, help="the column of the text to score (default: text)")
    io.add_argument("--prompt_column", default=None,
                    help="with --completion_column: the prompt's column (default: prompt), its tokens the context")
    io.add_argument("--completion_column", default=None,
                    help="score this column's text given the prompt's instead of a whole text")
    io.add_argument("--token_logprobs", action="store_true",
                    help="scores get token_ids and token_logprobs: each scored token and its log-probability")
    io.add_argument("--stride", type=int, default=None,
                   help="sequences longer than the context are scored in windows starting every this many tokens "
                        "(default: n_ctx // 2; below n_ctx)")
    _worker_options(p, "windows")
    _console_options(p)
    return p


def sampling(args: argparse.Namespace) -> SamplingParams:
    """The run's sampling defaults from the options (seed: the run seed)."""
    return SamplingParams(**{name: getattr(args, name) for name in FIELDS})


def max_batch_tokens(args: argparse.Namespace, manifest: dict, scoring: bool = False) -> int:
    """--max_batch_tokens, or by default the model's (transforms.batching.max_batch_tokens_for)."""
    config = manifest["config"]
    if args.max_batch_tokens is not None:
        return args.max_batch_tokens
    return max_batch_tokens_for(config["n_layer"], ModelConfig.from_dict(config).kv_width, scoring)


def _check_common(args: argparse.Namespace, beam_args: list[str], prog: str) -> PipelineOptions:
    """The checks of the options both jobs share, and the Beam options: a UsageError for anything wrong."""
    for name in ("batch_size", "max_batch_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.intra_op_threads is not None and args.intra_op_threads < 1:
        raise UsageError(f"--intra_op_threads must be >= 1, got {args.intra_op_threads}")
    if not args.progress_seconds >= 0:
        raise UsageError(f"--progress_seconds must be >= 0, got {args.progress_seconds}")
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
        raise UsageError(f"unknown option(s): {' '.join(unknown)} (see {prog} --help)")
    mismatch = worker_beam_mismatch(options, args.worker_beam_version)
    if mismatch:
        raise UsageError(mismatch)
    return options


def parse(argv: list[str]) -> tuple[argparse.Namespace, PipelineOptions]:
    args, beam_args = build_parser().parse_known_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    if not args.run_seconds > 0:
        raise UsageError(f"--run_seconds must be > 0, got {args.run_seconds}")
    try:
        sampling(args).validate()
    except ValueError as e:  # "top_p must be in (0, 1], got 1.5"
        raise UsageError(f"--{e}") from None
    return args, _check_common(args, beam_args, "python -m pipeline.run")


def parse_score(argv: list[str]) -> tuple[argparse.Namespace, PipelineOptions]:
    """The scoring job's options; args.text_column is the column read as each row's text, or with
    args.completion_column, its prompt (args.prompt_column)."""
    args, beam_args = build_score_parser().parse_known_args(argv)
    if args.completion_column is None:
        if args.prompt_column is not None:
            raise UsageError("--prompt_column goes with --completion_column (a completion is scored given its "
                             "prompt); to score whole texts, use --text_column")
        args.text_column = args.text_column or "text"
    else:
        if args.text_column is not None:
            raise UsageError("--text_column scores whole texts; --completion_column scores a completion given "
                             "--prompt_column: give one or the other")
        args.prompt_column = args.prompt_column or "prompt"
        if args.prompt_column == args.completion_column:
            raise UsageError(f"--prompt_column and --completion_column are both {args.prompt_column!r}")
    return args, _check_common(args, beam_args, "python -m pipeline.score")
