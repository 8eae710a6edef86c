"""The safetensors file format at the byte level: read a file's layout and single tensors, write a file tensor by
tensor. The `safetensors` library reads lazily but writes only from a dict of every tensor (serialised once more
as bytes: twice a shard in memory); these functions hold one tensor at a time.

    file   = N (u64, little-endian) · header (N bytes of JSON, space-padded) · data
    header = {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
             offsets relative to the start of data; tensors packed, row-major, little-endian
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from abliterate.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: `begin`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Layout:
    path: Path
    data_start: int  # 8 + header length: where tensor data begins
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]

    def in_file_order(self) -> list[TensorEntry]:
        return sorted(self.entries.values(), key=lambda entry: entry.begin)


def read_layout(path: str | Path) -> Layout:
    """Parse a safetensors header (reads only the header). Malformed file → UserError."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries = {name: TensorEntry(name, info["dtype"], tuple(info["shape"]), data_start + info["data_offsets"][0],
                                 data_start + info["data_offsets"][1]) for name, info in header.items()}
    return Layout(path, data_start, entries, metadata)


def read_tensor(handle: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """The tensor's bytes read straight into a new tensor's memory (one copy; no mapping of the file)."""
    if entry.dtype not in DTYPES:
        raise UserError(f"tensor {entry.name} is stored as {entry.dtype}, which this reader does not handle")
    raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    handle.seek(entry.begin)
    filled = 0
    while filled < len(view):
        count = handle.readinto(view[filled:])
        if not count:
            raise UserError(f"{getattr(handle, 'name', 'file')} ends inside tensor {entry.name}; the file is truncated")
        filled += count
    return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)


def write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> int:
    """Append the tensor's bytes (row-major, native = little-endian order); the number written."""
    data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    written = 0
    while written < len(data):
        written += handle.write(data[written:])
    return written


def copy_range(source: BinaryIO, target: BinaryIO, offset: int, length: int) -> None:
    """Append `length` bytes of `source` from `offset` to `target`: in the kernel where it can (nothing passes
    through this process's memory), else in 16 MiB pieces. Both files unbuffered (`buffering=0`)."""
    remaining = length
    try:
        while remaining:
            copied = os.copy_file_range(source.fileno(), target.fileno(), remaining, offset + length - remaining)
            if copied == 0:
                raise UserError(f"{source.name} is shorter than its header says; the file is truncated")
            remaining -= copied
        return
    except (AttributeError, OSError):  # no copy_file_range here (other OS, filesystem): copy by hand
        pass
    position = offset + length - remaining
    while remaining:
        chunk = os.pread(source.fileno(), min(_COPY_CHUNK, remaining), position)
        if not chunk:
            raise UserError(f"{source.name} is shorter than its header says; the file is truncated")
        write_tensor(target, torch.frombuffer(bytearray(chunk), dtype=torch.uint8))
        position += len(chunk)
        remaining -= len(chunk)


def header_bytes(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """Length prefix and header for tensors (name, dtype name, shape) stored in this order, packed."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = DTYPES[dtype].itemsize if dtype != "BOOL" else 1
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text


def write_streaming(path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]],
                    make_tensor: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are made one at a time by `make_tensor(name)` (only one in memory)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb", buffering=0) as handle:
            handle.write(header_bytes(specs, metadata))
            for name, dtype, shape in specs:
                tensor = make_tensor(name)
                if DTYPE_NAMES[tensor.dtype] != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
                write_tensor(handle, tensor)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
