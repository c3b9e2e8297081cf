"""The job on Beam's portable runner: a job service and an external worker pool, each its own process, as on a
cluster; its output must equal the DirectRunner's. The pool runs in another directory than the job is launched
from, so relative paths that only the launcher could resolve would fail here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run import run
from tests.helpers import completions, free_port, serve, write_shards

REPO = Path(__file__).resolve().parents[1]


def worker_env() -> dict:
    # The pool starts each worker as `python` from PATH: it must be this interpreter, with the project importable.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """(job service port, worker pool port, worker pool log), both stopped (with the pool's workers) after."""
    d = tmp_path_factory.mktemp("services")
    job_port, pool_port = free_port(), free_port()
    with serve([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                "--port", str(job_port)], job_port, d / "job_service.log", cwd=d, env=worker_env()), \
            serve([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                   "--service_port", str(pool_port)], pool_port, d / "worker_pool.log", cwd=d, env=worker_env()):
        yield job_port, pool_port, d / "worker_pool.log"


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, model_dir) -> Path:
    """Three prompt shards and a link to the model, to be named by relative paths from this directory."""
    d = tmp_path_factory.mktemp("job")
    write_shards(d / "in")
    (d / "model").symlink_to(model_dir)
    return d


def test_portable_runner_equals_direct_runner(services, job_dir):
    job_port, pool_port, pool_log = services
    common = ["--input", "in/*.parquet", "--model_dir", "model", "--max_new_tokens", "5",
              "--temperature", "0.7", "--seed", "3", "--batch_size", "3"]
    portable = subprocess.Popen(  # launched as a user would, from the job's directory with relative paths
        [sys.executable, "-m", "pipeline.run", *common, "--output", "portable", "--runner", "PortableRunner",
         "--job_endpoint", f"localhost:{job_port}", "--environment_type", "EXTERNAL",
         "--environment_config", f"localhost:{pool_port}"],
        cwd=job_dir, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cwd = os.getcwd()
    try:  # meanwhile the reference run, in this process
        os.chdir(job_dir)
        report = run([*common, "--output", "direct", "--runner", "FnApiRunner"])
    finally:
        os.chdir(cwd)
    _, stderr = portable.communicate(timeout=300)
    assert portable.returncode == 0, stderr[-3000:]
    assert "Starting worker" in pool_log.read_text()  # the DoFns ran in the pool's workers, not in the launcher
    assert report["rows_written"] == 12 and report["accounted"]
    portable, direct = completions(str(job_dir / "portable")), completions(str(job_dir / "direct"))
    assert list(portable) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert portable == direct
