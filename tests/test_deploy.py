"""DEPLOY.md's commands and the worker Dockerfile against the Beam and Python in use: a misspelt or retired flag, a
bad --flink_version, or an image that drifted from the launcher's Beam fails here rather than on a cluster."""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import apache_beam

from pipeline.options import parse

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"PROJECT": "my-project", "REGION": "us-central1", "BUCKET": "my-bucket",
                "IMAGE": "us-central1-docker.pkg.dev/my-project/gpt2/gpt2-beam-worker:0.1.0"}


def job_commands(markdown: str) -> list[list[str]]:
    """Every `python -m pipeline.run ...` in the document's bash blocks, continuation lines joined, variables set."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python -m pipeline.run"):
                expanded = re.sub(r"\$(\w+)", lambda m: PLACEHOLDERS[m.group(1)], line)
                commands.append(shlex.split(expanded)[3:])
    return commands


def test_every_documented_job_command_parses():
    commands = job_commands((REPO / "DEPLOY.md").read_text())
    runners = [c[c.index("--runner") + 1] for c in commands]
    assert runners.count("DataflowRunner") == 2 and runners.count("FlinkRunner") == 2 and "PortableRunner" in runners
    for argv in commands:
        args, options = parse(argv)  # raises UsageError naming any option Beam does not know
        assert args.input and args.output and args.model_dir
        assert options.get_all_options()["runner"] in runners


def test_worker_image_matches_this_beam_and_python():
    dockerfile = (REPO / "Dockerfile").read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"FROM apache/beam_python{python}_sdk:{apache_beam.__version__}\n" in dockerfile
    assert f'"apache-beam[gcp]=={apache_beam.__version__}"' in dockerfile
    copied = set(re.findall(r"^COPY (.+) \S+$", dockerfile, re.M))
    files = {name for line in copied for name in line.split()}
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages | {"setup.py", "requirements.txt", "MANIFEST.in"} <= files
    assert os.path.exists(REPO / ".dockerignore")
