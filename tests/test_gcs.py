"""gs:// end to end against a real GCS emulator server (gcp-storage-emulator), and the workers' local model cache.

Beam's GCS filesystem and google-cloud-storage send their requests to $STORAGE_EMULATOR_HOST. Credentials: Beam
asks google.auth for default credentials first and, finding none, retries for ~25 s (and probes the GCE metadata
server) before going anonymous; a credentials file holding a token valid until 2099 is found at once and never
refreshed, and the emulator ignores the token.
"""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

from lmgraph.manifest import ModelError, read_manifest, verify_files
from pipeline.run import main, run
from tests.helpers import completions, free_port, serve, write_shards
from transforms.model_cache import CACHE_ENV, check_model_dir, fetch_model

BUCKET = "gpt2-beam-test"
FAKE_TOKEN = {"type": "authorized_user", "client_id": "test", "client_secret": "test", "refresh_token": "test",
              "token": "test", "expiry": "2099-01-01T00:00:00Z"}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator running, and this process (and the processes it starts) pointed at it; restored after."""
    d = tmp_path_factory.mktemp("gcs")
    (d / "credentials.json").write_text(json.dumps(FAKE_TOKEN))
    port = free_port()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "test",
           "GOOGLE_APPLICATION_CREDENTIALS": str(d / "credentials.json"), "NO_GCE_CHECK": "true",
           CACHE_ENV: str(d / "cache")}
    saved = {k: os.environ.get(k) for k in env}
    with serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                "--default-bucket", BUCKET, "--in-memory"], port, d / "emulator.log"):
        os.environ.update(env)
        try:
            yield d
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def upload(local: Path, remote: str) -> str:
    for f in sorted(local.iterdir()):
        with FileSystems.create(FileSystems.join(remote, f.name)) as out:
            out.write(f.read_bytes())
    return remote


@pytest.fixture(scope="module")
def remote_model(gcs, model_dir) -> str:
    return upload(model_dir, f"gs://{BUCKET}/models/tiny")


def test_job_on_gcs_equals_local_run(gcs, remote_model, model_dir, tmp_path):
    shards = tmp_path / "in"
    write_shards(shards)
    upload(shards, f"gs://{BUCKET}/prompts")
    common = ["--max_new_tokens", "5", "--temperature", "0.8", "--seed", "5"]
    # two worker processes, each loading the model through the cache at the same time
    report = run(["--input", f"gs://{BUCKET}/prompts/*.parquet", "--output", f"gs://{BUCKET}/out",
                  "--model_dir", remote_model, *common, "--direct_num_workers", "2",
                  "--direct_running_mode", "multi_processing"])
    assert report["accounted"] and report["rows_written"] == 12
    local = run(["--input", str(shards / "*.parquet"), "--output", str(tmp_path / "out"),
                 "--model_dir", str(model_dir), *common, "--runner", "FnApiRunner"])
    assert report["model"] == local["model"]
    on_gcs = completions(f"gs://{BUCKET}/out")
    assert list(on_gcs) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert on_gcs == completions(str(tmp_path / "out"))
    assert FileSystems.exists(f"gs://{BUCKET}/out/run_report.json")
    entries = [p for p in (gcs / "cache").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and filecmp.dircmp(entries[0], model_dir).diff_files == []


FETCH = """import json, sys
from transforms.model_cache import fetch_model
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(fetch_model(sys.argv[1], sys.argv[2])), flush=True)
"""


def test_concurrent_fetches_give_one_verified_copy(gcs, remote_model, model_dir, tmp_path):
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, remote_model, str(root)], env=env, text=True, **pipes)
             for _ in range(2)]
    for p in procs:  # both imported and waiting: then everyone starts at once
        assert p.stdout.readline() == "ready\n"
    results, start = [], threading.Barrier(4)

    def fetch():
        start.wait()
        results.append(fetch_model(remote_model, root))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        results.append(tuple(json.loads(out)))
    paths = {path for path, _ in results}
    assert len(paths) == 1 and sum(fetched for _, fetched in results) == 1  # one download, shared by all six
    path = Path(paths.pop())
    verify_files(path, read_manifest(path))
    assert sorted(p.name for p in root.iterdir()) == [path.name, path.name + ".lock"]  # no temporary leftovers
    assert filecmp.dircmp(path, model_dir).diff_files == []
    assert fetch_model(str(model_dir), root) == (str(model_dir), False)  # a local directory is used as it is


def test_tampered_remote_file_is_refused(gcs, model_dir, tmp_path):
    remote = upload(model_dir, f"gs://{BUCKET}/models/tampered")
    vocab = json.loads((model_dir / "vocab.json").read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    with FileSystems.create(f"{remote}/vocab.json") as f:
        f.write(json.dumps(vocab).encode())
    with pytest.raises(ModelError, match=f"{remote}: vocab.json does not match its sha256"):
        fetch_model(remote, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_broken_remote_model_dirs_are_usage_errors(gcs, model_dir, tmp_path, capsys):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    escaping = upload(model_dir, f"gs://{BUCKET}/models/escaping")
    with FileSystems.create(f"{escaping}/manifest.json") as f:
        f.write(json.dumps({**manifest, "files": {**manifest["files"], "../x": "0" * 64}}).encode())
    with pytest.raises(ModelError, match="'../x' points outside the model directory"):
        fetch_model(escaping, tmp_path / "cache")
    incomplete = f"gs://{BUCKET}/models/incomplete"
    for name in ("manifest.json", "model.pb"):
        with FileSystems.create(f"{incomplete}/{name}") as f:
            f.write((model_dir / name).read_bytes())
    missing = ", ".join(n for n in manifest["files"] if n != "model.pb")
    with pytest.raises(ModelError, match=f"{incomplete}: {missing} listed in the manifest but missing"):
        check_model_dir(incomplete)
    write_shards(tmp_path / "in", shards=1)
    assert main(["--input", str(tmp_path / "in/*.parquet"), "--output", str(tmp_path / "out"),
                 "--model_dir", f"gs://{BUCKET}/models/none"]) == 2
    assert "gs://gpt2-beam-test/models/none: no manifest.json" in capsys.readouterr().err
