"""Where and in which dtype a run computes: ``--device`` / ``--dtype`` resolution and the compiler check of
``--enable-torch-compile``. Each refuses a bad value with a one-line error before anything is loaded."""

from __future__ import annotations

import torch

from signround.errors import SignRoundError


def check_cpu_compiler() -> None:
    """``--enable-torch-compile`` on the CPU: inductor builds C++; fail before loading anything without one.

    Raises:
        SignRoundError: no working C++ compiler (``g++``/``clang++``, or ``$CXX``).
    """
    from torch._inductor import cpp_builder  # only this check needs inductor

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler or an OSError
        raise SignRoundError(
            "--enable-torch-compile on the CPU needs a C++ compiler (install g++ or set CXX), or drop the flag"
        ) from None


def resolve_device(spec: str | None) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``; None means CUDA when it is available, else the CPU.

    Raises:
        SignRoundError: not a device torch knows, another kind, or a CUDA device this process cannot see.
    """
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise SignRoundError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SignRoundError(f"--device {spec}: this torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise SignRoundError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise SignRoundError(f"--device {spec}: signround runs on cpu or cuda")
    return str(dev)


def compute_dtype(name: str, device: str | None):
    """The model dtype for ``--dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU (bfloat16 matmuls are
    faster on CPUs with avx512_bf16/AMX, but tuning quality in bfloat16 on CPU is not measured yet)."""
    if name == "auto":
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)
