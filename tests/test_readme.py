"""README.md's shell commands, as written: every command of its ```bash blocks is one this file knows, every flag in
it is one the tool's `--help` lists (or, for the jobs, one Beam's option parser knows), and every value given to an
option with choices is one of them. The slow test then runs them in README order in a temporary directory:
`--random` exports, sample data, the jobs and the scoring jobs, and `./run_local.sh`. A command it cannot run
here is only checked: an export of a real checkpoint (except the one this file gives a tiny stand-in of the same
model type, so that the chat example has a model with a chat template), `gs://` paths or a remote runner, the test
suite itself. A job whose `--model_dir` no README command wrote runs on the `--random` export as a stand-in.

README's Python snippets run in tests/test_generate_text.py; DEPLOY.md's commands are checked in tests/test_deploy.py.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_CHARS = 15_000
SECTIONS = ["The two commands", "Export a model", "The job", "Use it in your own pipeline", "Scoring",
            "Precision and speed", "Deploy", "Architecture"]
TWO_COMMANDS = [["./run_local.sh"], ["python", "-m", "pytest", "-q", "tests"]]
JOBS = ("pipeline.run", "pipeline.score")  # options they do not list are Beam's
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "PrismRunner")
# Real checkpoints the slow test makes a tiny random stand-in of, of the same model type and tokenizer kind
# (bench.checkpoints): (shape, tokenizer)
STAND_INS = {"hf/Qwen2.5-0.5B-Instruct": ("tiny-qwen2", "chatml")}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang == language]


def commands(text: str | None = None) -> list[list[str]]:
    """Each command of the bash blocks as the shell would pass it: continuation lines joined, comments dropped,
    quotes removed (a quoted glob reaches the program as written)."""
    found = []
    for block in code_blocks(readme() if text is None else text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                found.append(argv)
    return found


def tool(argv: list[str]) -> str:
    """The program a command runs: a module for `python -m`, else the script; a command this file does not know
    fails here, so that a new kind of command in README gets a check of its own."""
    if argv[0] == "./run_local.sh":
        return "run_local.sh"
    if argv[:2] == ["bash", ".ci/run"]:
        return ".ci/run"
    if argv[:2] == ["python", "-m"] and len(argv) > 2:
        module = argv[2]
        if module == "pytest" or module.startswith(("pipeline.", "bench.")):
            return module
    raise AssertionError(f"README command not known to tests/test_readme.py: {shlex.join(argv)}")


def arguments(argv: list[str]) -> list[str]:
    return argv[1:] if tool(argv) == "run_local.sh" else argv[3:]


def option(args: list[str], name: str) -> str | None:
    """The value of --name in args (either `--name value` or `--name=value`), or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@functools.lru_cache(maxsize=None)
def help_text(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, f"python -m {module} --help: {out.stderr[-2000:]}"
    return out.stdout


def listed_flags(module: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", help_text(module)))


def listed_choices(module: str) -> dict[str, set[str]]:
    """{flag: its choices} from the usage lines, e.g. `[--output_format {parquet,jsonl}]`."""
    usage = help_text(module).split("\n\n", 1)[0]
    return {flag: set(choices.split(",")) for flag, choices in re.findall(r"(--[\w-]+) \{([^}]*)\}", usage)}


def beam_unknown(flags: list[str]) -> list[str]:
    """Those of `flags` (the Beam options of a job command) that Beam's option parser does not know."""
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    try:  # quietly: Beam logs the options it discards
        beam_log.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()):
            known = PipelineOptions(flags).get_all_options(retain_unknown_options=False)
    finally:
        beam_log.setLevel(level)
    return [f for f in flags if f.startswith("--") and f[2:].split("=")[0] not in known]


def check_flags(argv: list[str]) -> None:
    """Every flag of the command exists in its tool's --help (a job's other flags in Beam's parser), and a value
    given to an option with choices is one of them."""
    name = tool(argv)
    if name in (".ci/run", "pytest"):
        assert (REPO / "tests").is_dir()
        return
    module = "pipeline.run" if name == "run_local.sh" else name  # run_local.sh passes its options to the job
    args = arguments(argv)
    flags = [a for a in args if a.startswith("--")]
    ours = listed_flags(module)
    others = [f for f in flags if f.split("=")[0] not in ours]
    if module in JOBS:  # the rest go to Beam, with their values
        beam_args = [a for i, a in enumerate(args) if a in others or (i and args[i - 1] in others
                                                                       and not a.startswith("--"))]
        assert not beam_unknown(beam_args), f"{shlex.join(argv)}: not an option of {module} or of Beam"
    else:
        assert not others, f"{shlex.join(argv)}: {others} not in `python -m {module} --help`"
    for flag, choices in listed_choices(module).items():
        value = option(args, flag)
        assert value is None or value in choices, f"{shlex.join(argv)}: {flag} {value} not one of {choices}"


def runs_here(argv: list[str]) -> bool:
    """Whether the slow test runs the command (else it is only checked)."""
    name, args = tool(argv), arguments(argv)
    if name in (".ci/run", "pytest") or name.startswith("bench."):
        return False  # the suite does not run itself; benchmarks take minutes
    if any(a.startswith("gs://") for a in args) or option(args, "--runner") not in (None, *LOCAL_RUNNERS):
        return False
    checkpoint = option(args, "--checkpoint")
    return checkpoint is None or checkpoint in STAND_INS


# --- the fast checks -----------------------------------------------------------------------------------------------

def test_readme_is_a_short_guide_in_order():
    text = readme()
    assert len(text) <= MAX_CHARS, f"README.md is {len(text)} characters, over {MAX_CHARS}: move reference to docs/"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == SECTIONS
    assert commands()[:2] == TWO_COMMANDS, "the first bash block holds the two commands"


def test_ci_runs_the_readme_test_command():
    assert shlex.join(TWO_COMMANDS[1]) in (REPO / ".ci" / "run").read_text()


def test_every_command_is_known_and_its_flags_exist():
    cmds = commands()
    assert len(cmds) >= 10
    for argv in cmds:
        check_flags(argv)


def test_flag_check_catches_a_misspelt_flag():
    with pytest.raises(AssertionError):
        check_flags(["python", "-m", "pipeline.export", "--random", "tiny", "--ouput", "m"])
    with pytest.raises(AssertionError):
        check_flags(["python", "-m", "pipeline.run", "--input", "x", "--output", "y", "--model_dir", "z",
                     "--max_new_tokenz", "8"])
    with pytest.raises(AssertionError):
        check_flags(["python", "-m", "pipeline.run", "--input", "x", "--output", "y", "--model_dir", "z",
                     "--output_format", "csv"])
    check_flags(["python", "-m", "pipeline.run", "--input", "gs://b/*.parquet", "--output", "gs://b/out",
                 "--model_dir", "gs://b/m", "--runner", "DataflowRunner", "--project", "p", "--region", "r",
                 "--experiments=no_use_multiple_sdk_containers"])


def test_json_examples_are_json_objects():
    blocks = code_blocks(readme(), "json")
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            assert isinstance(json.loads(line), dict), line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Relative links in README.md, docs/ and BENCHMARKS.md point at files that exist, and anchors at headings."""
    pages = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 2, "docs/ holds the reference pages"
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
                assert anchor in {slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


# --- running them ----------------------------------------------------------------------------------------------

def run_module(argv: list[str]) -> int:
    """`python -m module args` in this process: the module's main() with sys.argv as the command gives it (the
    modules' `__main__` only adds a process exit)."""
    module = importlib.import_module(argv[2])
    saved = sys.argv
    sys.argv = [argv[2], *argv[3:]]
    try:
        code = module.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    return code or 0


def write_examples(root: Path) -> None:
    """README's JSON Lines examples as input shards: chat rows under chats/, the others under prompts/."""
    for block in code_blocks(readme(), "json"):
        directory = root / ("chats" if '"messages"' in block else "prompts")
        directory.mkdir(exist_ok=True)
        (directory / f"readme-{len(list(directory.iterdir()))}.jsonl").write_text(block, encoding="utf-8")


def run_local(root: Path, argv: list[str], stand_in: Path) -> subprocess.CompletedProcess:
    """./run_local.sh in root: the script and the lock linked in, a .venv whose python is this one (already holding
    the locked versions and the project) and which says it installed this lock, and the demo model already there
    (the tiny stand-in: exporting 124M takes half a minute)."""
    for name in ("run_local.sh", "requirements.lock"):
        if not (root / name).exists():
            (root / name).symlink_to(REPO / name)
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (venv / "installed.lock").write_bytes((REPO / "requirements.lock").read_bytes())
    demo = root / "models" / "gpt2-124M-random"
    if not demo.exists():
        demo.parent.mkdir(exist_ok=True)
        demo.symlink_to(stand_in.resolve(), target_is_directory=True)
    return subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.slow
def test_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_examples(tmp_path)
    ran, checked, deferred = [], [], []
    stand_in: Path | None = None  # the first --random export: the model of jobs whose --model_dir no command wrote
    for argv in commands():
        check_flags(argv)
        if not runs_here(argv):
            checked.append(argv)
            continue
        if tool(argv) == "run_local.sh":
            deferred.append(argv)
            continue
        args = arguments(argv)
        start = time.perf_counter()
        checkpoint = option(args, "--checkpoint")
        if checkpoint in STAND_INS:
            from bench.checkpoints import make_model

            shape, tokenizer = STAND_INS[checkpoint]
            make_model(tmp_path / checkpoint, shape, tokenizer=tokenizer)
        model_dir, output = option(args, "--model_dir"), option(args, "--output")
        if tool(argv) in JOBS and not Path(model_dir).exists():
            assert stand_in is not None, f"{shlex.join(argv)}: no --random export before it to stand in"
            Path(model_dir).parent.mkdir(parents=True, exist_ok=True)
            Path(model_dir).symlink_to(stand_in.resolve(), target_is_directory=True)
        resuming = "--skip_existing" in args and Path(output).exists()
        assert run_module(argv) == 0, shlex.join(argv)
        ran.append((argv, time.perf_counter() - start))
        if tool(argv) == "pipeline.export" and option(args, "--random") and stand_in is None:
            stand_in = tmp_path / output
        if tool(argv) in JOBS:  # every row accounted for, and README's examples make no dead letters
            report = json.loads((tmp_path / output / "run_report.json").read_text())
            assert report["accounted"] and report["rows_dead_lettered"] == 0, (shlex.join(argv), report)
            if resuming:  # the same input again: every shard is done
                assert report["shards_skipped_existing"] and not report["rows_written"], report
            else:
                assert report["rows_read"] > 0, report
    for argv in deferred:
        start = time.perf_counter()
        out = run_local(tmp_path, argv, stand_in)
        assert out.returncode == 0, out.stderr[-3000:]
        assert re.search(r"^rows read \d+, written \d+", out.stdout, re.M), out.stdout[-3000:]
        ran.append((argv, time.perf_counter() - start))
    print(f"\nran {len(ran)} README commands, checked {len(checked)} without running them:")
    for argv, seconds in ran:
        print(f"  ran ({seconds:.1f} s): {shlex.join(argv)}")
    for argv in checked:
        print("  checked:", shlex.join(argv))
    ran_tools = {tool(argv) for argv, _ in ran}
    assert {"pipeline.export", "pipeline.run", "pipeline.score", "run_local.sh"} <= ran_tools, ran_tools
