"""Per-worker-process resources, loaded once and shared by all threads through Beam's `Shared`.

Beam's `Shared` identifies an object by the handle it was created with (a key pickled with it) and a tag: DoFns that
must share one object in a worker process must hold copies of the same handle. `BatchWork` (transforms/work.py)
makes one tokenizer handle and gives it to both Prepare and Format: one tokenizer per process, one look-up of a
gs:// model.
"""
from __future__ import annotations

from apache_beam.utils.shared import Shared


class SharedResource:
    """A picklable handle: every copy of a DoFn holding it gets the same object within one worker process."""

    def __init__(self, load, key: str):
        self._shared, self._load, self._key = Shared(), load, key

    def get(self):
        return self._shared.acquire(self._load, tag=self._key)


def load_tokenizer(model_dir: str):
    """The model's tokenizer (lmgraph.tokenizer.load_tokenizer: its tokenizer.json, else GPT-2's files)."""
    from lmgraph.tokenizer import load_tokenizer as load
    from transforms.model_cache import local_model_dir

    return load(local_model_dir(model_dir))


def load_model(model_dir: str, precision: str = "auto", intra_threads: int | None = None):
    from lmgraph.loader import GenerationModel
    from transforms.model_cache import local_model_dir

    return GenerationModel(local_model_dir(model_dir), precision=precision, intra_threads=intra_threads)


def shared_tokenizer(model_dir: str) -> SharedResource:
    return SharedResource(lambda: load_tokenizer(model_dir), f"tokenizer:{model_dir}")


def shared_model(model_dir: str, precision: str = "auto", intra_threads: int | None = None) -> SharedResource:
    return SharedResource(lambda: load_model(model_dir, precision, intra_threads), f"model:{model_dir}:{precision}")
