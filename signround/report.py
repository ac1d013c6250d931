"""What a run reports (per-block losses, time, peak memory) and the process-memory helpers it measures with."""

from __future__ import annotations

import ctypes
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check: avx512_bf16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class BlockReport:
    index: int
    name: str
    rtn_loss: float
    first_loss: float
    best_loss: float
    final_loss: float
    steps: int
    seconds: float
    # mixture of experts: calibration tokens the float model routed to each expert, {experts module: [E]}
    expert_tokens: dict[str, list[int]] | None = None
    # starved experts (fewer tokens than TuneConfig.expert_min_tokens), one dict each: "module", "expert",
    # "tokens", "mode" (what it got: own / init / block) and, for own / init, "rtn_loss" and "loss" (its own
    # output error over every calibration token at round-to-nearest and as quantized; with
    # TuneConfig.holdout, "holdout" as below for its own tuning)
    starved: list[dict[str, Any]] | None = None
    # TuneConfig.holdout > 0: the block's loss on its held-out calibration samples at the start and tuned, and
    # whether it kept the start: {"samples", "start", "tuned", "kept_start"}
    holdout: dict[str, Any] | None = None


@dataclass
class RunReport:
    """What a run did: per-block losses, time and peak memory."""

    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_gb: float = 0.0
    peak_gpu_gb: float | None = None  # torch's CUDA allocator peak on the tuning device; None on the CPU
    nsamples: int = 0
    seqlen: int = 0

    def summary(self) -> str:
        if self.blocks and self.nsamples == 0:
            return (
                f"rounded {len(self.blocks)} blocks to nearest (no calibration data) in {self.seconds:.1f} s, "
                f"peak memory {self.peak_rss_gb:.2f} GB{self._gpu()}"
            )
        lines = [
            f"{'block':>5}  {'rtn loss':>10}  {'first':>10}  {'best':>10}  {'final':>10}  {'steps':>5}  {'sec':>6}"
        ]
        for b in self.blocks:
            lines.append(
                f"{b.index:>5}  {b.rtn_loss:>10.4g}  {b.first_loss:>10.4g}  {b.best_loss:>10.4g}  "
                f"{b.final_loss:>10.4g}  {b.steps:>5}  {b.seconds:>6.1f}"
            )
        lines.append(
            f"quantized {len(self.blocks)} blocks on {self.nsamples} x {self.seqlen} calibration tokens in "
            f"{self.seconds:.1f} s, peak memory {self.peak_rss_gb:.2f} GB{self._gpu()}"
        )
        return "\n".join(lines)

    def _gpu(self) -> str:
        return "" if self.peak_gpu_gb is None else f", peak GPU memory {self.peak_gpu_gb:.2f} GB"


def holdout_summary(report: RunReport) -> str | None:
    """One line on the held-out check (``TuneConfig.holdout``): how many blocks kept their start because the
    steps made them worse on the held-out samples; None when no block was checked."""
    checked = [b for b in report.blocks if b.holdout]
    if not checked:
        return None
    kept = [b.index for b in checked if b.holdout["kept_start"]]
    which = f" (blocks {', '.join(map(str, kept))})" if kept else ""
    return (
        f"held-out check (--holdout {checked[0].holdout['samples']}): {len(kept)} of {len(checked)} blocks kept "
        f"their starting rounding, the steps having raised their loss on the held-out samples{which}"
    )


def peak_gpu_gb(dev: torch.device) -> float | None:
    """Peak bytes torch's CUDA allocator held on ``dev`` since the run began, in GB; None off CUDA."""
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``ru_maxrss``: Linux carries a parent's high-water mark into a child across fork and exec, so a
    process started by a large one (a benchmark driver) would report at least the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024 / 1e9 if sys.platform != "darwin" else kib / 1e9


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere. Called once per
    block, so the float weights and activations a finished block freed leave the process's RSS."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
