"""Per-worker-process resources, loaded once and shared by all threads through Beam's `Shared`."""
from __future__ import annotations

from apache_beam.utils.shared import Shared

from gpt2.loader import GenerationModel
from gpt2.tokenizer import Tokenizer
from transforms.model_cache import local_model_dir


class SharedResource:
    """A picklable handle: every copy of a DoFn holding it gets the same object within one worker process."""

    def __init__(self, load, key: str):
        self._shared, self._load, self._key = Shared(), load, key

    def get(self):
        return self._shared.acquire(self._load, tag=self._key)


def shared_tokenizer(model_dir: str) -> SharedResource:
    return SharedResource(lambda: Tokenizer(local_model_dir(model_dir)), f"tokenizer:{model_dir}")


def shared_model(model_dir: str, precision: str = "auto", intra_threads: int | None = None) -> SharedResource:
    return SharedResource(lambda: GenerationModel(local_model_dir(model_dir), precision=precision,
                                                  intra_threads=intra_threads),
                          f"model:{model_dir}:{precision}")
