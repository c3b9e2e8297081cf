"""The launcher's Beam against the workers': a job whose workers run another Beam than the machine that launches it
fails on the cluster, late and obscurely (the runner API protos and coders differ), so it is refused at launch.

WORKER_BEAM_VERSION is the Beam of the worker image this repository builds: the lock's (requirements.lock), kept
equal to it by `.ci/relock` and by tests/test_deploy.py.
"""
from __future__ import annotations

import apache_beam
from apache_beam.options.pipeline_options import PipelineOptions

WORKER_BEAM_VERSION = "2.78.0"

# Runners whose workers are this process or its children: they run this Beam whatever the lock says.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "PrismRunner",
                 "TestDirectRunner", "InteractiveRunner")


def names_workers(options: dict) -> bool:
    """Whether the job runs its code in workers it names (an image, an external pool, a command on the workers)
    rather than in Beam's default image, which the runners pick by the launcher's own Beam version."""
    environment = (options.get("environment_type") or "").upper()
    return bool(options.get("sdk_container_image") or options.get("worker_harness_container_image")
                or environment in ("EXTERNAL", "PROCESS")
                or (environment == "DOCKER" and options.get("environment_config")))


def worker_beam_mismatch(options: PipelineOptions, worker_version: str = WORKER_BEAM_VERSION) -> str | None:
    """A one-line explanation when a remote job's named workers run another Beam than this launcher, else None."""
    values = options.get_all_options()
    runner = (values.get("runner") or "DirectRunner").rsplit(".", 1)[-1]
    launcher = apache_beam.__version__
    if runner in LOCAL_RUNNERS or not names_workers(values) or launcher == worker_version:
        return None
    install = ("pip install -r requirements.lock" if worker_version == WORKER_BEAM_VERSION
               else f"pip install apache-beam[gcp]=={worker_version}")
    return (f"this launcher has apache-beam {launcher} but the worker image has {worker_version}: install the "
            f"image's Beam here ({install}), or use an image built with Beam {launcher} and pass "
            f"--worker_beam_version {launcher}")
