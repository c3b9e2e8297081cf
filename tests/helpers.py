"""What the tests that start real services share: free ports, waiting for a server, small jobs and their output."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

READY_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    """Return once something accepts connections on the port; raise with the server's log if it died or hung."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {READY_SECONDS} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def serve(argv: list[str], port: int, log: Path, **popen):
    """Run a server until the block ends; it gets a session of its own, so that killing that session also ends
    whatever the server started (a worker pool's workers)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_shards(directory: Path, shards: int = 3, rows: int = 4) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        paths.append(directory / f"part-{s}.parquet")
        pq.write_table(pa.table({"id": [f"s{s}-{i}" for i in range(rows)],
                                 "prompt": [f"the cat {i} sat on mat {s}" for i in range(rows)]}), paths[-1])
    return paths


def completions(output_dir: str) -> dict[str, list[tuple]]:
    """Output file name -> (id, completion, token ids, finish reason) per row, local or gs:// alike."""
    pattern = FileSystems.join(output_dir, "completions", "*.parquet")
    files = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    return {f.rsplit("/", 1)[-1]: [(r["id"], r["completion"], r["completion_token_ids"], r["finish_reason"])
                                   for r in pq.read_table(FileSystems.open(f)).to_pylist()]
            for f in files}
