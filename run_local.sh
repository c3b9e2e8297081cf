#!/usr/bin/env bash
# Run the generation job on this machine with Beam's DirectRunner.
#
#   ./run_local.sh
#       demo: makes a random-weight GPT-2 124M (real vocabulary) and sample prompt shards, then runs on them
#   ./run_local.sh --input 'data/*.parquet' --output out/ --model_dir models/gpt2 [job or Beam options]
#       your data and model (see README: "Export a model"); any other option is passed through,
#       e.g. --max_new_tokens 32 --temperature 0.8 --direct_num_workers 2 --direct_running_mode multi_processing
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The locked versions (requirements.lock), again whenever the lock changed since this venv was installed
if ! cmp -s requirements.lock "$VENV/installed.lock" \
    || ! "$PY" -c "import lmgraph, apache_beam, tensorflow, tiktoken" 2>/dev/null; then
  echo "installing the locked versions and the project into $VENV" >&2
  "$PY" -m pip install -q "pip==26.3"
  "$PY" -m pip install -q -r requirements.lock
  # setuptools' build backend warns "Editable installation ..." on every editable install: a note, not a problem
  PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  cp requirements.lock "$VENV/installed.lock"
fi

input="" output="" model_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --input) input="${args[$((i + 1))]:-}" ;;
    --input=*) input="${args[$i]#*=}" ;;
    --output) output="${args[$((i + 1))]:-}" ;;
    --output=*) output="${args[$i]#*=}" ;;
    --model_dir) model_dir="${args[$((i + 1))]:-}" ;;
    --model_dir=*) model_dir="${args[$i]#*=}" ;;
  esac
done

extra=()
if [ -z "$model_dir" ]; then
  model_dir="models/gpt2-124M-random"
  # (re-)export when missing, or written by an older exporter than this checkout's loader reads
  if ! "$PY" -c "import sys; from lmgraph.manifest import read_manifest; read_manifest(sys.argv[1])" "$model_dir" \
      2>/dev/null; then
    echo "exporting the demo model (random weights, GPT-2 124M shape) to $model_dir" >&2
    echo "  for real weights: python -m pipeline.export --checkpoint DIR --output MODEL_DIR" >&2
    "$PY" -m pipeline.export --random 124M --output "$model_dir"
  fi
  extra+=(--model_dir "$model_dir")
fi
if [ -z "$input" ]; then
  if ! ls data/sample_prompts/*.parquet >/dev/null 2>&1; then
    "$PY" -m pipeline.sample_data --output data/sample_prompts >/dev/null
  fi
  input="data/sample_prompts/*.parquet"
  extra+=(--input "$input" --max_new_tokens 32)
fi
if [ -z "$output" ]; then
  output="output/local-run"
  extra+=(--output "$output")
fi

"$PY" -m pipeline.run "${extra[@]}" "$@"

echo
echo "completions: $output/completions/   dead letters: $output/errors/   report: $output/run_report.json"
"$PY" - "$output" <<'PYEOF'
import glob, json, sys
import pyarrow.parquet as pq
out = sys.argv[1]
report = json.load(open(f"{out}/run_report.json"))
print(f"rows read {report['rows_read']}, written {report['rows_written']}, dead-lettered "
      f"{report['rows_dead_lettered']}, skipped as done {report['rows_skipped_existing']}; "
      f"{report['generated_tokens']} tokens, {report['tokens_per_second']} tokens/s")
files = sorted(glob.glob(f"{out}/completions/*.parquet") + glob.glob(f"{out}/completions/*.jsonl"))
if files and files[0].endswith(".jsonl"):
    rows = [json.loads(line) for line in open(files[0], encoding="utf-8")][:3]
else:
    rows = pq.read_table(files[0]).to_pylist()[:3] if files else []
for r in rows:
    print(f"\n[{r['id']}] {r['prompt']!r}\n  -> {r['completion']!r} ({r['finish_reason']})")
PYEOF
