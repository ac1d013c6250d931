"""The one orchestrator: calibrate, then tune and pack block by block.

For block ``i``: the float block's outputs on the float inputs are the targets (computed once);
``tune_block`` learns the rounding against them from the quantized model's inputs; the block's
linears are replaced by packed ``QuantLinear`` layers; the quantized block's outputs become the next
block's quantized inputs and the targets the next float inputs. Devices, memory, progress and the
summary live here, nowhere else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from signround import dist
from signround._version import __version__
from signround.act.calibrate import calibrate_static
from signround.act.smooth import smooth_block
from signround.calib.capture import block_output, capture_block_inputs, to_device
from signround.calib.data import calibration_tokens, sample_tokens
from signround.config import ActScheme, CalibConfig, QuantConfig, QuantScheme
from signround.errors import SignRoundError
from signround.model.blocks import Planned, block_linears, check_finite, find_blocks, resolve_schemes
from signround.model.lazy import BlockStream
from signround.pack.packed import QuantLinear
from signround.runstate import RunState, fingerprint
from signround.tune.signround import BlockResult, LayerResult, output_loss, tune_block
from signround.tune.wrapper import TunableWeight

log = logging.getLogger("signround")


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


def resolve_tokens(model: nn.Module, tokenizer: Any, calib: CalibConfig, data: Any) -> torch.Tensor:
    """Calibration tokens from ``data``: a ``[n, seqlen]`` tensor, a list of texts, or None/a path/name
    (resolved through ``calib.dataset``)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise SignRoundError("calibration token tensor must be int64 [nsamples, seqlen]")
        return data[: calib.nsamples, : calib.seqlen]
    if isinstance(data, Sequence) and not isinstance(data, str):
        return sample_tokens(list(data), tokenizer, calib)
    return calibration_tokens(model, tokenizer, calib)


@torch.no_grad()
def _run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], batch_size: int) -> torch.Tensor:
    outs = [block_output(block(inputs[i : i + batch_size], **kwargs)) for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(outs).to(inputs.dtype)


def _replace_linears(
    block: nn.Module, result: BlockResult, act: ActScheme | None = None, scales: dict[str, torch.Tensor] | None = None
) -> None:
    for name, layer in result.layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        old = getattr(parent, child)
        qlayer = QuantLinear.from_codes(layer.codes, layer.scale, layer.zero, layer.scheme, old.bias)
        qlayer.set_act(act, (scales or {}).get(name))
        qlayer.to(old.weight.device)
        setattr(parent, child, qlayer)


def rtn_block(block: nn.Module, schemes: dict[str, QuantScheme], act: ActScheme | None = None) -> None:
    """Round-to-nearest of the linears named in ``schemes``, in place (no data: RTN needs only weights;
    ``act`` may only be per-token, whose scales need no data either)."""
    linears = block_linears(block)
    layers = {}
    for name, scheme in schemes.items():
        codes, scale, zero = TunableWeight.from_linear(linears[name], scheme, learn=False).finalize()
        layers[name] = LayerResult(codes, scale, zero, scheme)
    nan = float("nan")
    _replace_linears(block, BlockResult(layers, nan, nan, nan, nan, 0, 0, 0.0), act)


def _rtn_without_data(
    prefix: str,
    blocks: list[nn.Module],
    plans: list[dict[str, QuantScheme]],
    dev: torch.device,
    progress: bool,
    act: ActScheme | None = None,
    stream: BlockStream | None = None,
    state: RunState | None = None,
) -> RunReport:
    """``--method rtn``: every block rounded to nearest from its weights alone (as auto-round's ``iters=0``);
    no calibration pass, so the report has no block losses. With a ``stream``, each block is loaded, rounded,
    persisted in ``state`` and freed."""
    log.info("RTN: rounding weights to nearest; no calibration data is used")
    report = RunReport()
    for i, block in enumerate(tqdm(blocks, desc="rounding", unit="block", disable=not progress, file=sys.stderr)):
        t = time.perf_counter()
        if stream is not None:
            stream.materialize(i)
        home = next(block.parameters()).device
        rtn_block(block.to(dev), plans[i], act)
        block.to(home)
        nan = float("nan")
        report.blocks.append(BlockReport(i, f"{prefix}.{i}", nan, nan, nan, nan, 0, time.perf_counter() - t))
        if stream is not None and state is not None:
            state.save_block(i, block, dataclasses.asdict(report.blocks[-1]), None, None)
            stream.release(i, state.block_file(i))
        release_freed_memory()
    return report


def _settings(model: nn.Module, cfg: QuantConfig) -> dict[str, Any]:
    """What decides a run's result besides the calibration tokens (for resume fingerprints)."""
    return {"model": model.config.to_dict(), "cfg": dataclasses.asdict(cfg)}


def plan(model: nn.Module, cfg: QuantConfig) -> list[Planned]:
    """Every linear that :func:`run` will quantize, with its scheme and shape (for exporters' checks)."""
    prefix, blocks = find_blocks(model)
    planned = []
    for i, block in enumerate(blocks):
        layers = dict(block.named_modules())
        for name, scheme in resolve_schemes(f"{prefix}.{i}", block, cfg.scheme, cfg.layer_rules).items():
            planned.append(Planned(f"{prefix}.{i}.{name}", scheme, layers[name].in_features, layers[name].out_features))
    return planned


def run(
    model: nn.Module,
    tokenizer: Any,
    cfg: QuantConfig,
    data: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
    resume: bool = False,
    stream: BlockStream | None = None,
    block_parallel: bool = False,
) -> RunReport:
    """Quantize ``model`` in place (its block linears become ``QuantLinear``) and return the report.

    Args:
        model: an HF causal LM in float precision, in eval mode.
        tokenizer: its tokenizer (used for calibration text).
        cfg: scheme, per-layer rules, tuning and calibration settings.
        data: calibration tokens ``[n, seqlen]``, a list of texts, or None to use ``cfg.calib.dataset``.
        device: where blocks are tuned (default: CUDA when available, else CPU).
        progress: show progress bars.
        state_dir: a run folder where every finished block is persisted (see :mod:`signround.runstate`);
            the caller deletes it once the output is saved.
        resume: continue the interrupted run saved in ``state_dir``.
        stream: the model came from :func:`signround.model.lazy.load_skeleton` (blocks on the meta device):
            each block is loaded before it is tuned and freed once it is persisted in ``state_dir``
            (required); writers read the finished blocks back from there (``stream.packed``).
        block_parallel: in a torch.distributed run with ``cfg.tune.quant_inputs`` off, rank ``r`` tunes the
            blocks ``i % world == r`` and writes them to ``state_dir``; rank 0 gathers them (see
            :mod:`signround.dist`). Otherwise every rank tunes every block on its share of each batch.
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_finite(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if cfg.tune.amp and dev.type == "cpu" and not native_bf16_cpu():
        log.warning(
            "--amp: this CPU has no native bfloat16 matmuls (avx512_bf16 or AMX); bfloat16 autocast runs several "
            "times slower than float32 here, so drop --amp"
        )
    prefix, blocks = find_blocks(model)
    plans = [resolve_schemes(f"{prefix}.{i}", block, cfg.scheme, cfg.layer_rules) for i, block in enumerate(blocks)]
    if not any(plans):
        raise SignRoundError("no layer is left to quantize; check --layer-config")
    streamed = stream is not None and not stream.keep  # blocks are freed once persisted (--low-memory)
    if block_parallel and (cfg.tune.quant_inputs or state_dir is None or resume or streamed):
        raise SignRoundError(
            "block-parallel tuning needs blocks tuned on float inputs (--fp-inputs) and a run folder, and "
            "cannot resume or stream (--low-memory)"
        )
    if streamed and state_dir is None:
        raise SignRoundError("a streamed (--low-memory) run keeps its finished blocks in a run folder; give state_dir")
    if not cfg.needs_calibration:
        state = None
        if streamed:  # rounding needs no data and takes seconds per block: a resumed run starts over
            shutil.rmtree(Path(state_dir), ignore_errors=True)
            no_tokens = torch.zeros(0, dtype=torch.long)
            state = RunState(Path(state_dir), fingerprint(_settings(model, cfg), no_tokens), False)
        report = _rtn_without_data(prefix, blocks, plans, dev, progress, cfg.act, stream, state)
        model.config.quantization_config = quantization_config(model, cfg, prefix, report)
        report.seconds = time.perf_counter() - t0
        report.peak_rss_gb = peak_rss_gb()
        report.peak_gpu_gb = peak_gpu_gb(dev)
        return report
    state_path = Path(state_dir) if state_dir is not None else None
    tokens = RunState.saved_tokens(state_path) if state_path is not None and resume else None
    if tokens is None:
        tokens = resolve_tokens(model, tokenizer, cfg.calib, data)
    main_rank = dist.is_main()  # in a distributed run, rank 0 alone keeps the run state
    state = (
        RunState(state_path, fingerprint(_settings(model, cfg), tokens), resume) if state_path and main_rank else None
    )
    if block_parallel:
        dist.barrier()  # the run folder exists before any rank writes a block into it
    inputs, kwargs = capture_block_inputs(model, blocks[0], tokens)
    if not torch.isfinite(inputs).all():
        raise SignRoundError("the model's activations at the first block are not finite; check the model's weights")
    report = RunReport(nsamples=tokens.shape[0], seqlen=tokens.shape[1])
    fp_inputs = q_inputs = inputs
    if state is not None and state.done:
        log.info("resuming: %d of %d blocks were finished in %s", state.done, len(blocks), state.folder)
        for i in range(state.done):
            state.restore_block(i, blocks[i], cfg.act)  # the packed structure only, for a block on meta
            if streamed:
                stream.packed[i] = state.block_file(i)
            elif stream is not None:  # blocks loaded on demand: the finished ones come back whole
                state.load_block(i, blocks[i])
        report.blocks = [BlockReport(**r) for r in state.reports]
        fp_inputs, q_inputs = state.load_inputs()
    elif state is not None:
        state.save_tokens(tokens)
    kwargs = to_device(kwargs, dev)
    fp_inputs, q_inputs = fp_inputs.to(dev), q_inputs.to(dev)
    start = len(report.blocks)
    tune = cfg.tune
    bar = tqdm(total=len(blocks), initial=start, desc="quantizing", unit="block", disable=not progress, file=sys.stderr)
    rank, size = dist.world()
    parallel = block_parallel and size > 1
    for i in range(start, len(blocks)):
        block = stream.materialize(i) if stream is not None else blocks[i]
        home = next(block.parameters()).device
        block.to(dev)
        targets = _run_block(block, fp_inputs, kwargs, tune.batch_size)
        if not torch.isfinite(targets).all():
            raise SignRoundError(f"block {i} produced non-finite outputs on the calibration data; check the model")
        x = q_inputs if tune.quant_inputs else fp_inputs
        if parallel and i % size != rank:  # another rank tunes this block; the float chain goes on
            fp_inputs = q_inputs = targets
            block.to(home)
            bar.update(1)
            continue
        steps = tqdm(
            total=tune.iters, desc=f"block {i}", leave=False, disable=not progress or tune.iters == 0, file=sys.stderr
        )

        def on_step(step: int, loss: float, steps: tqdm = steps) -> None:
            steps.update(1)
            if step % 10 == 0:
                steps.set_postfix(loss=f"{loss:.4g}")

        if cfg.smooth:
            alphas = smooth_block(block, x, targets, kwargs, plans[i], cfg.act, tune.batch_size)
            log.info("block %d smoothing alpha: %s", i, alphas)
        scales = None
        if cfg.act is not None and cfg.act.granularity == "channel":
            scales, clips = calibrate_static(block, x, kwargs, list(plans[i]), cfg.act, tune.batch_size)
            log.info("block %d activation clip ratios: %s", i, clips)
        result = tune_block(
            block, x, targets, kwargs, plans[i], tune, seed=tune.seed + i, on_step=on_step,
            act=cfg.act, act_scales=scales, data_parallel=size > 1 and not parallel,
        )  # fmt: skip
        steps.close()
        _replace_linears(block, result, cfg.act, scales)
        out = _run_block(block, x, kwargs, tune.batch_size)
        final = output_loss(out, targets, tune.loss, tune.batch_size)
        if result.steps == 0:  # plain RTN: its loss is the final loss, measured once above
            result = dataclasses.replace(result, rtn_loss=final, first_loss=final, best_loss=final, last_loss=final)
        fp_inputs = targets
        q_inputs = out if tune.quant_inputs else fp_inputs
        block.to(home)
        entry = BlockReport(
            i, f"{prefix}.{i}", result.rtn_loss, result.first_loss, result.best_loss, final, result.steps,
            result.seconds,
        )  # fmt: skip
        report.blocks.append(entry)
        if parallel:
            RunState.write_block(Path(state_dir), i, block)
        elif state is not None:
            state.save_block(i, block, dataclasses.asdict(entry), fp_inputs, q_inputs)
            if streamed:
                stream.release(i, state.block_file(i))
        release_freed_memory()
        bar.set_postfix_str(f"loss rtn {result.rtn_loss:.3g} -> {final:.3g}")
        bar.update(1)
        log.info(
            "block %d/%d: loss rtn %.4g -> final %.4g (best step %.4g) in %.1f s",
            i + 1, len(blocks), result.rtn_loss, final, result.best_loss, result.seconds,
        )  # fmt: skip
    if parallel:
        report.blocks = _gather_blocks(report.blocks, blocks, state, cfg.act, size)
    bar.close()
    model.config.quantization_config = quantization_config(model, cfg, prefix, report)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_gb = peak_rss_gb()
    report.peak_gpu_gb = peak_gpu_gb(dev)
    return report


def _gather_blocks(
    mine: list[BlockReport], blocks: nn.ModuleList, state: RunState | None, act: ActScheme | None, size: int
) -> list[BlockReport]:
    """After a block-parallel loop: every rank's block reports (in block order), and on rank 0 the blocks
    that the other ranks tuned, read back from the run folder."""
    gathered: list[list[BlockReport] | None] = [None] * size
    torch.distributed.all_gather_object(gathered, mine)  # also waits until every rank has written its blocks
    every = sorted((b for part in gathered for b in part or []), key=lambda b: b.index)
    if state is not None:
        own = {b.index for b in mine}
        for b in every:
            if b.index not in own:
                state.restore_block(b.index, blocks[b.index], act)
    return every


def quantization_config(model: nn.Module, cfg: QuantConfig, prefix: str, report: RunReport) -> dict[str, Any]:
    """The ``quantization_config`` recorded in ``config.json`` (see docs/checkpoint.md)."""
    modules = {
        name: module.scheme.to_dict() for name, module in model.named_modules() if isinstance(module, QuantLinear)
    }
    tune = cfg.tune
    return {
        "quant_method": "signround",
        "format": "signround-native",
        "version": 1,
        "signround_version": __version__,
        **cfg.scheme.to_dict(),
        "block_name_to_quantize": prefix,
        "packing": "int32, 32//bits codes per word along the input dimension, least significant bits first",
        "modules": modules,
        "tuning": {"method": "rtn", "iters": 0}
        if tune.iters == 0
        else {
            "method": tune.method.value,
            "iters": tune.iters,
            "lr": tune.effective_lr,
            "minmax_lr": tune.effective_minmax_lr,
            "batch_size": tune.batch_size,
            "use_best": tune.use_best,
            "seed": tune.seed,
            "amp": tune.amp,
            "loss": tune.loss,
            "init": tune.init,
            **({} if tune.quant_inputs else {"quant_inputs": False}),
            **({"torch_compile": True} if tune.torch_compile else {}),
            "nsamples": report.nsamples,
            "seqlen": report.seqlen,
            "dataset": cfg.calib.dataset,
        },
        **({"serve_bits": list(cfg.serve_bits)} if cfg.serve_bits else {}),
        **({"activations": {**cfg.act.to_dict(), "smooth": cfg.smooth}} if cfg.act is not None else {}),
    }
