"""Reading tensors out of safetensors files without keeping the file mapped: each tensor read straight into
memory it owns (the block-streaming reader's and the loaders' one path to the bytes)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import torch

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
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for name in names:
            info = header[name]
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            begin = 8 + size + info["data_offsets"][0]
            target = dtype if stored.is_floating_point else stored
            t = torch.empty(info["shape"], dtype=target)
            if target == stored:
                _read_exact(f, begin, t.view(-1), name)
            else:
                flat, step = t.view(-1), max(1, _READ_CHUNK // stored.itemsize)
                buf = torch.empty(min(step, flat.numel()), dtype=stored)
                for i in range(0, flat.numel(), step):
                    part = buf[: min(step, flat.numel() - i)]
                    _read_exact(f, begin + i * stored.itemsize, part, name)
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
