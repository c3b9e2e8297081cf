"""The scoring job: text shards (Parquet or JSON Lines) in, each row's log-likelihood under the model out.

  python -m pipeline.score --input 'texts/*.parquet' --output out/ --model_dir models/gpt2 [options] [Beam options]
  python -m pipeline.score ... --prompt_column prompt --completion_column completion   # a completion given its prompt

The generation job's launcher (pipeline/run.py `run_job`) with this job's transform (transforms.job.ScoreTexts: read
| ScoreText | write): the same checks, reading, ids, dead letters, --skip_existing, progress lines and run report,
with DIR/scores/ instead of DIR/completions/ and scored tokens instead of generated ones.
"""
from __future__ import annotations

import apache_beam as beam

from pipeline.options import UsageError, max_batch_tokens, parse_score
from pipeline.run import Job, exit_process, main as run_main, run_job
from transforms.job import ScoreJobConfig, ScoreTexts
from transforms.progress import SCORED_TOKENS
from transforms.score_text import check_stride


def scoring(args, manifest: dict, model: str, done: tuple[str, ...], paths: list[str]) -> beam.PTransform:
    """The scoring job's transform; --stride checked against the model's context."""
    n_ctx = manifest["config"]["n_ctx"]
    stride = n_ctx // 2 if args.stride is None else args.stride
    try:
        check_stride(stride, n_ctx)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    options = ({args.text_column: "--text_column"} if args.completion_column is None else
               {args.prompt_column: "--prompt_column", args.completion_column: "--completion_column"})
    return ScoreTexts(ScoreJobConfig(
        output_dir=args.output, model_dir=args.model_dir, model_label=model, n_ctx=n_ctx,
        text_column=args.text_column if args.completion_column is None else args.prompt_column,
        completion_column=args.completion_column, id_column=args.id_column, stride=stride,
        token_logprobs=args.token_logprobs, batch_size=args.batch_size,
        max_batch_tokens=max_batch_tokens(args, manifest, scoring=True),
        precision=args.precision, intra_op_threads=args.intra_op_threads, output_format=args.output_format,
        done_files=done, options=tuple(options.items())))


SCORE_JOB = Job("scores", "tokens", SCORED_TOKENS, scoring)


def run(argv: list[str]) -> dict:
    args, options = parse_score(argv)
    return run_job(args, options, SCORE_JOB)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_score, SCORE_JOB)


if __name__ == "__main__":
    exit_process(main())
