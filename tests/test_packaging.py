"""What a cluster runs: the package built as Dataflow's --setup_file builds it, installed into a clean virtual
environment and imported from there; and the job's pipeline as a runner API proto, the form a job service receives.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PipelineVisitor
from packaging.requirements import Requirement

from transforms.job import GenerateCompletions, JobConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lmgraph", "pipeline", "transforms")
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "build", "dist",
                                     "models", "data", "output")

# Run by the clean environment's interpreter from an empty directory, so that nothing comes from the repo.
CHECK_INSTALLED = """
import importlib, importlib.metadata, sys
from pathlib import Path
from apache_beam.internal import pickler
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(sys.prefix), f"{name} imported from {module.__file__}"
from transforms.generate import GenerateBatches, Generation
from transforms.resources import shared_tokenizer
from transforms.work import Prepare
for fn in (GenerateBatches("gs://bucket/model"), Prepare(Generation(n_ctx=1024), shared_tokenizer("gs://bucket/model"))):
    assert type(pickler.loads(pickler.dumps(fn))) is type(fn)
print("\\n".join(importlib.metadata.requires("gpt2-beam")))
"""


def run(*argv: str, cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv}: {done.stderr[-3000:]}"
    return done.stdout


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def test_sdist_installs_and_imports_in_a_clean_venv(tmp_path):
    src, dist, venv, elsewhere = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)  # build side effects (egg-info) stay out of the work tree
    elsewhere.mkdir()
    # the command Beam's stager runs for --setup_file (it needs no network: the build backend is already here)
    run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(src), cwd=src)
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    modules = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert {"requirements.txt", "setup.py", "MANIFEST.in"} <= names and modules <= names
    assert not any(n.startswith("tests/") for n in names)

    # A wheel built from the sdist alone (setup.py reading requirements.txt there), installed without its
    # dependencies into a venv of its own; the dependencies (TensorFlow, Beam: GBs) come from this environment,
    # on the path after the venv's own site-packages, where the project is not.
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", str(dist), str(sdist), cwd=elsewhere)
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=elsewhere)
    python = str(venv / "bin" / "python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        str(next(dist.glob("*.whl"))), cwd=elsewhere)
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages(venv) / "dev-dependencies.pth").write_text("\n".join(dependencies) + "\n")

    modules = [f"{pkg}.{p.stem}" for pkg in PACKAGES for p in sorted((REPO / pkg).glob("[!_]*.py"))]
    requires = run(python, "-c", CHECK_INSTALLED, *modules, cwd=elsewhere).splitlines()
    expected = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # as requirements, not text: the metadata writes a range's bounds in its own order (numpy<3,>=1.26)
    assert list(map(Requirement, requires[:len(expected)])) == list(map(Requirement, expected))


def dofns(pipeline: beam.Pipeline) -> list[tuple[str, str, dict]]:
    """(transform name, DoFn class, DoFn attributes that are plain values) of every ParDo."""
    found = []

    class Visitor(PipelineVisitor):
        def visit_transform(self, node):
            fn = getattr(node.transform, "fn", None)
            if isinstance(fn, beam.DoFn):
                values = {**vars(fn), **vars(fn.task)} if hasattr(fn, "task") else vars(fn)  # a task's fields too
                plain = {k: v for k, v in values.items() if isinstance(v, (str, int, float, tuple, list))}
                found.append((node.full_label, type(fn).__name__, plain))

    pipeline.visit(Visitor())
    return sorted(found)


@pytest.mark.parametrize("model_dir", ["/models/tiny", "gs://bucket/models/tiny"])
def test_pipeline_round_trips_through_the_runner_api(model_dir):
    config = JobConfig(output_dir="gs://bucket/out", model_dir=model_dir, model_label="tiny@0123", n_ctx=1024,
                       stops=("\n\n",), batch_size=8, max_batch_tokens=4096)  # all given: no manifest is read
    p = beam.Pipeline()
    _ = p | "Inputs" >> beam.Create(["gs://bucket/in/part-0.parquet"]) | "Generate" >> GenerateCompletions(config)
    proto = p.to_runner_api()
    again = beam.Pipeline.from_runner_api(proto, p.runner, PipelineOptions())
    assert again.to_runner_api().components.transforms.keys() == proto.components.transforms.keys()
    before, after = dofns(p), dofns(again)
    assert [name for name, _, _ in after] == [name for name, _, _ in before]
    assert after == before
    attrs = {cls: a for _, cls, a in after}
    assert {"GenerateBatches", "Prepare", "Format", "WriteShard", "ReadRowGroup"} <= attrs.keys()
    assert attrs["WriteShard"]["output_dir"] == "gs://bucket/out" and attrs["Format"]["stops"] == ("\n\n",)
    assert attrs["Prepare"]["n_ctx"] == 1024 and attrs["Format"]["model_label"] == "tiny@0123"
