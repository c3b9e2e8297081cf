"""The launch-time check of the launcher's Beam against the worker image's (pipeline/beam_version.py): a remote job
whose named workers run another Beam is refused with one line naming both versions; local jobs and jobs on Beam's
default images are not affected."""
from __future__ import annotations

import apache_beam
import pytest

from pipeline import run
from pipeline.beam_version import WORKER_BEAM_VERSION
from pipeline.options import UsageError, parse, parse_score

JOB = ["--input", "gs://b/in/*.parquet", "--output", "gs://b/out", "--model_dir", "gs://b/model"]
DATAFLOW_IMAGE = ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
                  "--temp_location", "gs://b/tmp", "--sdk_container_image", "example.com/worker:1"]
FLINK_DOCKER = ["--runner", "FlinkRunner", "--flink_master", "jm:8081", "--environment_type", "DOCKER",
                "--environment_config", "example.com/worker:1"]
PORTABLE_POOL = ["--runner", "PortableRunner", "--job_endpoint", "localhost:8099", "--environment_type", "EXTERNAL",
                 "--environment_config", "localhost:50000"]


@pytest.fixture
def other_beam(monkeypatch) -> str:
    """This launcher pretends to have another Beam than the lock's."""
    monkeypatch.setattr(apache_beam, "__version__", "2.0.0")
    return "2.0.0"


@pytest.mark.parametrize("remote", [DATAFLOW_IMAGE, FLINK_DOCKER, PORTABLE_POOL], ids=["dataflow", "flink", "pool"])
def test_a_remote_job_on_named_workers_with_another_beam_is_refused(other_beam, remote):
    with pytest.raises(UsageError) as refused:
        parse(JOB + remote)
    message = str(refused.value)
    assert "\n" not in message and other_beam in message and WORKER_BEAM_VERSION in message
    assert "pip install -r requirements.lock" in message and f"--worker_beam_version {other_beam}" in message
    with pytest.raises(UsageError):
        parse_score(JOB + remote)  # the scoring job's launcher is checked alike


def test_the_launcher_says_so_in_one_line_before_any_work(other_beam, capsys, monkeypatch):
    monkeypatch.setattr(run, "run_job", lambda *a: pytest.fail("the job started"))
    assert run.main(JOB + DATAFLOW_IMAGE) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this launcher has apache-beam 2.0.0") and err.count("\n") == 1


def test_the_same_beam_or_a_named_image_version_passes(other_beam, monkeypatch):
    parse(JOB + DATAFLOW_IMAGE + ["--worker_beam_version", other_beam])  # an image built from another lock
    monkeypatch.setattr(apache_beam, "__version__", WORKER_BEAM_VERSION)
    for remote in (DATAFLOW_IMAGE, FLINK_DOCKER, PORTABLE_POOL):
        parse(JOB + remote)


@pytest.mark.parametrize("beam_args", [
    [],  # the DirectRunner
    ["--runner", "DirectRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    ["--runner", "PrismRunner"],
    # Beam's default image, which the runner picks by this launcher's own version (--setup_file ships the package)
    ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1", "--temp_location", "gs://b/tmp",
     "--setup_file", "./setup.py"],
    ["--runner", "FlinkRunner", "--flink_master", "jm:8081", "--environment_type", "LOOPBACK"],
], ids=["default", "direct", "prism", "dataflow-default-image", "flink-loopback"])
def test_local_jobs_and_default_images_are_not_affected(other_beam, beam_args):
    parse(JOB + beam_args)
