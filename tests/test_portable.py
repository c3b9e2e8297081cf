"""The job on Beam's portable runner: a job service and an external worker pool, each its own process, as on a
cluster; its output must equal the DirectRunner's. The pool runs in another directory than the job is launched
from, so relative paths that only the launcher could resolve would fail here."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import run

REPO = Path(__file__).resolve().parents[1]
READY_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {READY_SECONDS} s: {log.read_text()[-2000:]}")


def worker_env() -> dict:
    # The pool starts each worker as `python` from PATH: it must be this interpreter, with the project importable.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """(job service port, worker pool port, worker pool log); both processes killed, with their workers, after."""
    d = tmp_path_factory.mktemp("services")
    job_port, pool_port = free_port(), free_port()
    commands = {
        "job_service": ["-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
        "worker_pool": ["-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
    }
    procs, logs = [], {}
    try:
        for name, args in commands.items():
            logs[name] = d / f"{name}.log"
            with open(logs[name], "wb") as log:  # a session of its own: teardown kills the workers it started too
                procs.append(subprocess.Popen([sys.executable, *args], cwd=d, env=worker_env(), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_port(job_port, procs[0], logs["job_service"])
        wait_for_port(pool_port, procs[1], logs["worker_pool"])
        yield job_port, pool_port, logs["worker_pool"]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, model_dir) -> Path:
    """Three prompt shards and a link to the model, to be named by relative paths from this directory."""
    d = tmp_path_factory.mktemp("job")
    (d / "in").mkdir()
    for s in range(3):
        pq.write_table(pa.table({"id": [f"s{s}-{i}" for i in range(4)],
                                 "prompt": [f"the cat {i} sat on mat {s}" for i in range(4)]}),
                       d / "in" / f"part-{s}.parquet")
    (d / "model").symlink_to(model_dir)
    return d


def completions(out: Path) -> dict[str, list]:
    return {f.name: [(r["id"], r["completion"], r["completion_token_ids"], r["finish_reason"])
                     for r in pq.read_table(f).to_pylist()]
            for f in sorted((out / "completions").glob("*.parquet"))}


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
    portable, direct = completions(job_dir / "portable"), completions(job_dir / "direct")
    assert list(portable) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert portable == direct
