"""safetensors files read and written a tensor at a time, so no file is ever held whole in memory.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (plus an
optional "__metadata__" of strings), then the tensors' raw bytes. The writer lays the tensors out as
safetensors' own writer does (by dtype, widest first, then by name) and pads the header with spaces to 8 bytes,
so its file is byte for byte what `safetensors.numpy.save_file` writes for the same tensors; it seeks to each
tensor's place, so tensors may arrive in any order. The reader uses plain reads (no mmap: mapped pages of a file
count in the process's resident memory for as long as it is mapped) and checks the untrusted header before
reading anything it points at. Nothing here unpickles.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

# safetensors dtype -> numpy dtype, in the order of safetensors' Dtype enum (its writer lays out the highest
# first). BF16 is read and written as its raw bits (numpy has no bfloat16); callers view them as they need.
DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
          "BF16": np.uint16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "F64": np.float64,
          "I64": np.int64, "U64": np.uint64}
_RANK = {name: i for i, name in enumerate(DTYPES)}
_NAMES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
          np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
          np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
          np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}
MAX_HEADER = 100 << 20  # safetensors' own limit
ALIGNMENT = 64  # what TensorFlow's CPU kernels want; a fed array that is not gets copied into TF's own pool


class TensorFileError(ValueError):
    """A safetensors file that is malformed or does not hold what was asked."""


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buf.ctypes.data % ALIGNMENT
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def dtype_name(dtype) -> str:
    """safetensors' name of a numpy dtype: BF16 for bfloat16 (ml_dtypes', as TensorFlow's as_numpy_dtype gives it)."""
    return "BF16" if np.dtype(dtype).name == "bfloat16" else _NAMES[np.dtype(dtype)]


def write(path: str | Path, specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
          tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of the tensors `specs` names ({name: (dtype, shape)}), taking each array from
    `tensors` as it comes, in any order; every tensor must come exactly once with its declared dtype and shape."""
    entries = sorted(((dtype_name(dt), tuple(shape), name) for name, (dt, shape) in specs.items()),
                     key=lambda e: (-_RANK[e[0]], e[2]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, where = 0, {}
    for dtype, shape, name in entries:
        size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        where[name] = offset
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(start + offset)
        for name, array in tensors:
            if name not in where:
                raise TensorFileError(f"{path}: {name!r} is not declared, or came twice")
            dtype, shape = specs[name]
            if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise TensorFileError(f"{path}: {name} is {array.dtype}{array.shape}, declared {np.dtype(dtype)}{tuple(shape)}")
            f.seek(start + where.pop(name))
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    if where:
        raise TensorFileError(f"{path}: tensors declared but never given: {sorted(where)[:5]}")


class Reader:
    """A safetensors file's header, checked, and its tensors read one at a time into aligned arrays.
    `header_bytes` then every tensor's bytes in `keys()` order are the whole file (for hashing as it is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self.header_bytes, self.entries = self._read_header()
        except Exception:
            self._file.close()
            raise

    def _read_header(self) -> tuple[bytes, dict[str, tuple[str, tuple[int, ...], int, int]]]:
        size = self.path.stat().st_size
        first = self._file.read(8)
        if len(first) < 8:
            raise TensorFileError(f"{self.path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", first)
        if n > min(MAX_HEADER, size - 8):
            raise TensorFileError(f"{self.path}: header of {n} bytes in a file of {size}")
        raw = self._file.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"{self.path}: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{self.path}: header is not a JSON object")
        header.pop("__metadata__", None)
        entries, data = {}, size - 8 - n
        for name, e in header.items():
            ok = (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
                  and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                  and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                  and all(isinstance(o, int) for o in e["data_offsets"]))
            if not ok:
                raise TensorFileError(f"{self.path}: malformed header entry {name!r}")
            begin, end = e["data_offsets"]
            want = math.prod(e["shape"]) * np.dtype(DTYPES[e["dtype"]]).itemsize
            if not 0 <= begin <= end <= data or end - begin != want:
                raise TensorFileError(f"{self.path}: {name} has offsets {begin}..{end}, not {want} bytes inside "
                                      f"the file's {data} data bytes")
            entries[name] = (e["dtype"], tuple(e["shape"]), 8 + n + begin, want)
        end = 8 + n  # as safetensors requires: the tensors tile the data, so reading them all reads every byte
        for _, _, start, nbytes in sorted(entries.values(), key=lambda e: e[2]):
            if start != end:
                raise TensorFileError(f"{self.path}: tensor data is not contiguous (a gap or an overlap)")
            end += nbytes
        if end != size:
            raise TensorFileError(f"{self.path}: {size - end} bytes after the last tensor")
        return first + raw, entries

    def keys(self) -> list[str]:
        """Tensor names in the order their bytes lie in the file (sequential reads)."""
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new aligned array of its numpy dtype (BF16: its uint16 bits)."""
        dtype, shape, start, nbytes = self._entry(name)
        out = aligned_empty(shape, DTYPES[dtype])
        self._read_into(memoryview(out.reshape(-1).view(np.uint8)), start, name)
        return out

    def _read_into(self, view: memoryview, start: int, name: str) -> None:
        """Positional reads (no shared file position: safe from several threads)."""
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], start + done)
            if not got:
                raise TensorFileError(f"{self.path}: ends inside {name}")
            done += got

    def _entry(self, name: str):
        if name not in self.entries:
            raise TensorFileError(f"{self.path} has no tensor {name!r}")
        return self.entries[name]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
