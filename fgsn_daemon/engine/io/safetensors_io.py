"""Low-level safetensors reading and streaming writing, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}``, then the raw row-major bytes. Parsing the header ourselves lets
us (a) validate untrusted files before touching data, (b) read single rows with ``pread``, and
(c) copy untouched tensors byte for byte without ever materialising them, so the memory of an
edit does not grow with the model. Written shards are plain safetensors files that both the
``safetensors`` library and transformers load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from fgsn_daemon.core.errors import CheckpointError
from fgsn_daemon.core.faults import fault_point

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # absolute file offsets of the data
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header; offsets must tile the data section exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(dtype, shape, base + begin, base + end)
        if begin < 0 or end - begin != info.nbytes or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets")
        infos[name] = info
        spans.append((begin, end))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves gaps")
        cursor = end
    return infos, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsFile:
    """One safetensors file opened for positional reads (no mmap, so RSS stays bounded)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos, self.metadata = parse_header(path)
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _pread(self, length: int, offset: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        fd = self._descriptor()
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file")
            done += got
        return buf

    def _to_tensor(self, buf: bytearray, info: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        if not buf:
            return torch.empty(shape, dtype=DTYPES[info.dtype])
        flat = torch.frombuffer(buf, dtype=torch.uint8).view(DTYPES[info.dtype])
        return flat.reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self._to_tensor(self._pread(info.nbytes, info.start), info, info.shape)

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows along axis 0, reading only their bytes (contiguous runs coalesced)."""
        info = self.infos[name]
        rows = list(rows)
        row_shape = info.shape[1:]
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        parts: list[torch.Tensor] = []
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                j += 1
            count = j - i + 1
            buf = self._pread(count * row_bytes, info.start + rows[i] * row_bytes)
            parts.append(self._to_tensor(buf, info, (count, *row_shape)))
            i = j + 1
        if not parts:
            return torch.empty((0, *row_shape), dtype=DTYPES[info.dtype])
        return torch.cat(parts)

    def copy_raw(self, name: str, out: BinaryIO) -> None:
        info = self.infos[name]
        offset, remaining = info.start, info.nbytes
        while remaining:
            chunk = self._pread(min(remaining, COPY_CHUNK_BYTES), offset)
            out.write(chunk)
            offset += len(chunk)
            remaining -= len(chunk)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


# A producer writes exactly ``info.nbytes`` bytes of one tensor to the open shard file.
Producer = Callable[[BinaryIO], None]


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    info: TensorInfo
    produce: Producer


def write_shard(path: Path, tensors: Iterable[PlannedTensor], metadata: dict[str, str]) -> int:
    """Stream one shard to ``path``: header first (from known shapes), then each tensor in turn."""
    planned = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in planned:
        header[t.name] = {
            "dtype": t.info.dtype,
            "shape": list(t.info.shape),
            "data_offsets": [offset, offset + t.info.nbytes],
        }
        offset += t.info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for i, t in enumerate(planned):
            before = f.tell()
            t.produce(f)
            if f.tell() - before != t.info.nbytes:
                raise RuntimeError(
                    f"producer for {t.name} wrote {f.tell() - before} bytes, not {t.info.nbytes}"
                )
            if i == 0:
                f.flush()
                fault_point("shard_half_written")
        f.flush()
        fault_point("shard_written_unsynced")
        os.fsync(f.fileno())
    return offset
