"""Reading tensors out of safetensors files: :func:`read_safetensors` reads each tensor straight into memory it
owns, nothing left mapped (the block-streaming reader's path: blocks are read whole and freed);
:func:`map_safetensors` leaves the tensors that live the whole run and are read in part (a large vocabulary's
embedding) on the file, as copy-on-write views of its memory map."""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from signround.errors import SignRoundError
from signround.model.blocks import _all_finite

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# bytes per read when a tensor is cast while it is read (the only temporary besides the result)
_READ_CHUNK = 1 << 24


def _header(f: io.RawIOBase) -> tuple[int, dict]:
    """``(first data byte, header)`` of an open safetensors file."""
    f.seek(0)
    (size,) = struct.unpack("<Q", f.read(8))
    return 8 + size, json.loads(f.read(size))


def map_safetensors(path: Path, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` as :func:`read_safetensors` gives them, except that a tensor stored in the dtype it is
    wanted in comes back as a view of a private (copy-on-write) memory map of the file: only the pages the run
    touches count in its RSS, and they are the file's, which the kernel can drop and read again: an embedding
    costs the pages of the rows calibration looks up, not its whole size (0.67 GB for a tied 262144 x 640
    float32 one). A write into such a tensor copies the page it touches; the file never
    changes. Tensors stored in another dtype (or at an offset their dtype cannot view) are read and cast as
    :func:`read_safetensors` does.

    Every floating-point tensor is checked for NaN and Inf here, because a check of the returned tensor would
    page the whole map in: the mapped ones by plain reads of the file in slices of :data:`_READ_CHUNK` bytes
    (one buffer; the page cache is not the process's RSS), the cast ones after the cast.

    Raises:
        SafetensorError, OSError, KeyError: as :func:`read_safetensors`.
        SignRoundError: a floating-point tensor holds NaN or Inf.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt"):  # validation first (header, offsets, length), as read_safetensors
        pass
    with open(path, "rb", buffering=0) as f:
        data, header = _header(f)
        mapped, read = [], []
        for name in names:
            stored = _SAFETENSORS_DTYPES[header[name]["dtype"]]
            target = dtype if stored.is_floating_point else stored
            begin = data + header[name]["data_offsets"][0]
            n = int(torch.Size(header[name]["shape"]).numel())
            (mapped if target == stored and n and begin % stored.itemsize == 0 else read).append(name)
        out = read_safetensors(path, read, dtype) if read else {}
        for name, t in out.items():
            if t.is_floating_point() and not _all_finite(t):
                raise SignRoundError(f"weight {name} contains NaN or Inf; the model file is corrupt")
        if not mapped:
            return out
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # stays open while a tensor holds it
        # lookups are scattered rows: no readahead, which would page in their neighbours too
        view.madvise(mmap.MADV_RANDOM)
        for name in mapped:
            info = header[name]
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (data + o for o in info["data_offsets"])
            if end > len(view):
                raise OSError(f"{name}: the file ends {end - len(view)} bytes before the tensor does")
            n = (end - begin) // stored.itemsize
            if stored.is_floating_point and not all(
                bool(torch.isfinite(p).all()) for _, p in _slices(f, begin, n, stored, name)
            ):
                raise SignRoundError(f"weight {name} contains NaN or Inf; the model file is corrupt")
            # the check's reads left these pages cached, and a fault maps the cached pages around it too:
            # drop them, so that a lookup pages in only its own rows
            os.posix_fadvise(f.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)
            out[name] = torch.frombuffer(view, dtype=stored, count=n, offset=begin).view(info["shape"])
    return out


def _slices(f: io.RawIOBase, begin: int, n: int, stored: torch.dtype, name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first index, values)`` of the ``n`` values of ``stored`` dtype at byte ``begin`` of ``f``, read in
    slices of :data:`_READ_CHUNK` bytes into one reused buffer (each slice is valid until the next)."""
    step = max(1, _READ_CHUNK // stored.itemsize)
    buf = torch.empty(min(step, n), dtype=stored)
    for i in range(0, n, step):
        part = buf[: min(step, n - i)]
        _read_exact(f, begin + i * stored.itemsize, part, name)
        yield i, part


def read_safetensors(path: Path, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for ``names`` of the safetensors file ``path``; floating-point tensors come back in
    ``dtype``, the others as stored. Each result owns its memory and nothing stays mapped.

    Read with plain file reads into the result, not through ``safe_open(...).get_tensor``: that returns a
    view of the file's memory map, whose touched pages count in the process's RSS while it is mapped, so a
    copy out of it costs twice the tensor (0.67 GB more at once for a 262144 x 640 float32 embedding). A
    tensor stored in another floating-point dtype is read and cast in slices of :data:`_READ_CHUNK` bytes.
    ``safe_open`` still validates the file first (header, offsets, length), with its own error messages.

    Raises:
        SafetensorError: the file is not valid safetensors (``safe_open``'s message).
        OSError: the file cannot be read, or ends before a tensor does.
        KeyError: a name the file does not hold.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt"):  # validation only: nothing is read through its map
        pass
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        data, header = _header(f)
        for name in names:
            info = header[name]
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            begin = data + info["data_offsets"][0]
            target = dtype if stored.is_floating_point else stored
            t = torch.empty(info["shape"], dtype=target)
            if target == stored:
                _read_exact(f, begin, t.view(-1), name)
            else:
                flat = t.view(-1)
                for i, part in _slices(f, begin, flat.numel(), stored, name):
                    flat[i : i + part.numel()].copy_(part)
            out[name] = t
    return out


def _read_exact(f: io.RawIOBase, offset: int, flat: torch.Tensor, name: str) -> None:
    """Fill the contiguous 1-D tensor ``flat`` with the bytes of ``f`` from ``offset`` on.

    Raises:
        OSError: the file ends first.
    """
    if flat.numel() == 0:
        return
    view = memoryview(flat.view(torch.uint8).numpy()).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):  # a raw read may return fewer bytes than asked (at most 2 GiB on Linux)
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{name}: the file ends {len(view) - done} bytes before the tensor does")
        done += n
