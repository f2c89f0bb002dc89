"""A local checkpoint's safetensors files, read by byte range: one open handle per file, no mapping.

safetensors' own `safe_open` maps the whole file, and under Gramine a mapping of a trusted
file is emulated by reading and verifying the whole range inside the enclave, once per open.
Here every shard is opened once, its header parsed once, and each tensor is read with `pread`
of exactly its bytes. The format is small: an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [start, end]}}, then the data.

`fingerprint` is a cheap content digest per tensor, so that two sides can tell whether they
hold the same weights (a mistake check, not a proof: see docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 8, 16 << 10  # per tensor: whole if smaller than this


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its shard's handle, dtype, shape and absolute byte range."""

    fd: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _pread_exact(fd: int, nbytes: int, offset: int, what: str) -> bytearray:
    """`nbytes` at `offset`, looping over short reads (one pread returns at most ~2 GB)."""
    out = bytearray(nbytes)
    view, done = memoryview(out), 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ModelError(f"{what}: file ends {nbytes - done} bytes early")
        done += got
    return out


def _parse_header(fd: int, path: Path) -> dict[str, TensorEntry]:
    size = os.fstat(fd).st_size
    if size < 8:
        raise ModelError(f"cannot read weights {path.name}: not a safetensors file")
    (length,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path.name))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ModelError(f"cannot read weights {path.name}: header of {length} bytes does not fit the file")
    try:
        header = json.loads(bytes(_pread_exact(fd, length, 8, path.name)))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read weights {path.name}: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ModelError(f"cannot read weights {path.name}: header is not a JSON object")
    base, entries = 8 + length, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            start, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"cannot read weights {path.name}: bad entry for {name!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end or base + end > size or end - start != math.prod(shape) * itemsize:
            raise ModelError(f"cannot read weights {path.name}: {name!r} does not fit its bytes")
        entries[name] = TensorEntry(fd, dtype, shape, base + start, base + end)
    return entries


class Checkpoint:
    """Every `*.safetensors` file of a model directory, indexed by tensor name."""

    def __init__(self, model_dir: str | Path):
        self._fds: list[int] = []
        self._entries: dict[str, TensorEntry] = {}
        self.model_dir = Path(model_dir)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no *.safetensors weights in {self.model_dir}")
        try:
            for path in files:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as err:
                    raise ModelError(f"cannot read weights {path.name}: {err.strerror}") from None
                self._fds.append(fd)
                self._entries.update(_parse_header(fd, path))
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelError(f"weight '{name}' not found in {self.model_dir}")
        return entry

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, read in one sequential pass over its bytes."""
        entry = self.entry(name)
        data = _pread_exact(entry.fd, entry.nbytes, entry.start, name)
        tensor = torch.frombuffer(data, dtype=entry.dtype) if entry.nbytes else torch.empty(0, dtype=entry.dtype)
        tensor = tensor.reshape(entry.shape)
        return tensor if dtype is None else tensor.to(dtype)

    def read_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a matrix, each read by its own byte range (for lookups whose pattern
        need not be hidden: the lean protocol's server sees the tokens anyway)."""
        entry = self.entry(name)
        width = math.prod(entry.shape[1:])
        row_bytes = width * torch.empty((), dtype=entry.dtype).element_size()
        wanted = ids.reshape(-1).tolist()
        picked = {i: torch.frombuffer(_pread_exact(entry.fd, row_bytes, entry.start + i * row_bytes, name),
                                      dtype=entry.dtype) for i in dict.fromkeys(wanted)}  # each distinct row once
        return torch.stack([picked[i] for i in wanted]).reshape(*ids.shape, *entry.shape[1:])

    def fingerprint(self) -> dict[str, str]:
        """Per tensor, a short digest of its dtype, shape and a few evenly spaced samples of its bytes."""
        digests = {}
        for name in self.names():
            entry = self._entries[name]
            h = hashlib.blake2b(f"{entry.dtype}{entry.shape}".encode(), digest_size=8)
            n = entry.nbytes
            count = FINGERPRINT_SAMPLES if n > FINGERPRINT_SAMPLES * FINGERPRINT_SAMPLE_BYTES else 1
            length = FINGERPRINT_SAMPLE_BYTES if count > 1 else n
            for i in range(count):
                offset = entry.start + (n - length) * i // max(count - 1, 1)
                h.update(_pread_exact(entry.fd, length, offset, name))
            digests[name] = h.hexdigest()
        return digests

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()
