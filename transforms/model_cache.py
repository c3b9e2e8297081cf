"""A model directory on gs:// (or any non-local Beam filesystem) copied once per machine to a local cache.

TensorFlow, tiktoken and safetensors read local files, and every worker process of every DoFn needs the model:
so the first to ask downloads it, the others (threads of this process: a lock; other processes: an flock on a
lock file) wait and reuse the copy. A copy is made in a temporary directory beside its final place, every file
checked against the sha256 in the manifest, then renamed into place in one step: a cache directory that exists is
complete and verified, and a killed download leaves only a temporary directory, removed by the next fetch.
The cache is keyed by the sha256 of the manifest (which holds every file's sha256), so a new model uploaded to the
same path is a new entry. Local paths are used as they are.

The cache root is $GPT2_BEAM_MODEL_CACHE, else <system temp dir>/gpt2-beam-models.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from lmgraph.config import ModelConfig
from lmgraph.manifest import MANIFEST, ModelError, model_label, read_manifest, verify_files
from transforms.batching import max_batch_tokens_for

log = logging.getLogger(__name__)
CACHE_ENV = "GPT2_BEAM_MODEL_CACHE"
CHUNK = 8 << 20

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "gpt2-beam-models")


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def listed_files(manifest: dict) -> list[str]:
    """The manifest's file names (lmgraph.manifest.read_manifest has refused any that could lead outside the
    model directory, before anything is written under that name)."""
    return list(manifest["files"])


def _remote_manifest(model_dir: str, into: Path) -> tuple[bytes, dict]:
    """Read model_dir's manifest through FileSystems into `into`, validated as lmgraph.manifest.read_manifest does."""
    path = FileSystems.join(model_dir, MANIFEST)
    if not FileSystems.exists(path):
        raise ModelError(f"{model_dir}: no manifest.json (is this a directory written by `python -m pipeline.export`?)")
    with _open(path) as f:
        raw = f.read()
    (into / MANIFEST).write_bytes(raw)
    try:
        return raw, read_manifest(into)
    except ModelError as e:
        raise ModelError(str(e).replace(str(into), model_dir)) from None


def check_model_dir(model_dir: str) -> dict:
    """The manifest of a model directory, checked before the job starts: a local directory fully (sha256 of every
    file); a remote one without downloading it (manifest valid, file names safe, every file present): the sha256
    check happens where it is copied, on the workers."""
    if is_local(model_dir):
        manifest = read_manifest(model_dir)
        verify_files(model_dir, manifest)
        return manifest
    with tempfile.TemporaryDirectory() as tmp:
        _, manifest = _remote_manifest(model_dir, Path(tmp))
    missing = [n for n in listed_files(manifest) if not FileSystems.exists(FileSystems.join(model_dir, n))]
    if missing:
        raise ModelError(f"{model_dir}: {', '.join(missing)} listed in the manifest but missing")
    return manifest


def _download(model_dir: str, raw_manifest: bytes, manifest: dict, tmp: Path) -> None:
    (tmp / MANIFEST).write_bytes(raw_manifest)  # the manifest read once: the cache key is its sha256
    for name in listed_files(manifest):
        dest = tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _open(FileSystems.join(model_dir, name)) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    try:
        verify_files(tmp, manifest)
    except ModelError as e:
        raise ModelError(str(e).replace(str(tmp), model_dir)) from None


def fetch_model(model_dir: str, root: str | Path | None = None) -> tuple[str, bool]:
    """(local directory holding model_dir's files, whether this call downloaded them)."""
    if is_local(model_dir):
        return model_dir, False
    root = Path(root or cache_root())
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_uid != os.getuid():  # in a shared temp dir, another user's entries could be planted ones
        raise ModelError(f"model cache {root} belongs to another user; set ${CACHE_ENV} to a directory of yours")
    with tempfile.TemporaryDirectory() as manifest_dir:
        raw, manifest = _remote_manifest(model_dir, Path(manifest_dir))
    key = hashlib.sha256(raw).hexdigest()
    final = root / key
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock, open(root / f"{key}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if final.is_dir():
            return str(final), False
        for stale in root.glob(f".{key}-*"):  # a download killed midway (we hold the lock: nobody else's)
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))  # same filesystem: the rename is atomic
        try:
            started = time.monotonic()
            _download(model_dir, raw, manifest, partial)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("copied model %s to %s in %.1f s", model_dir, final, time.monotonic() - started)
        return str(final), True


def local_model_dir(model_dir: str) -> str:
    """model_dir itself when local, else its verified copy in this machine's cache."""
    return fetch_model(model_dir)[0]


def model_manifest(model_dir: str) -> dict:
    """The manifest of a model directory, for the launcher (a model's name and context size come from it): a local
    one read and checked (its files' sha256 are verified where it is loaded), a remote one as check_model_dir."""
    return read_manifest(model_dir) if is_local(model_dir) else check_model_dir(model_dir)


class ModelInfo(NamedTuple):
    label: str  # name@sha256 prefix, written in every row
    n_ctx: int  # context size
    max_batch_tokens: int  # the caller's, or the model's default (batching.max_batch_tokens_for)


def model_identity(model_dir: str, label: str | None = None, n_ctx: int | None = None,
                   max_batch_tokens: int | None = None, scoring: bool = False) -> ModelInfo:
    """A model's label, context size and max_batch_tokens: as given by a caller that has them (the file jobs read
    the manifest once before they start), else from its manifest (lmgraph.manifest.ModelError if it is not a model
    directory)."""
    if label is None or n_ctx is None or max_batch_tokens is None:
        manifest = model_manifest(model_dir)
        config = manifest["config"]
        label = label or model_label(manifest)
        n_ctx = n_ctx or config["n_ctx"]
        if max_batch_tokens is None:
            max_batch_tokens = max_batch_tokens_for(config["n_layer"], ModelConfig.from_dict(config).kv_width,
                                                    scoring)
    return ModelInfo(label, n_ctx, max_batch_tokens)
