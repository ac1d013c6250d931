"""The run loop: calibrate, then for each block compute its targets, tune it, and finalize it.

For block ``i``: the float block's outputs on the float inputs are the targets (computed once); a tuning
function (:func:`signround.tune.signround.tune_block`, or :func:`signround.tune.rtn.tune_rtn` when no step
is taken) learns the rounding against them from the quantized model's inputs; the block's linears are
replaced by packed ``QuantLinear`` layers; the quantized block's outputs become the next block's quantized
inputs and the targets the next float inputs. Devices, processes, resume state, streaming, progress bars
and the report live here, in one :class:`_Run` context; the per-layer plan (schemes, mixed precision,
format search, export checks) is decided before, by :mod:`signround.plan`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from signround import dist
from signround._version import __version__
from signround.act.calibrate import calibrate_static
from signround.act.hadamard import carry_online
from signround.act.smooth import smooth_block
from signround.calib.capture import block_output, capture_block_inputs, capture_block_kwargs, to_device
from signround.calib.data import resolve_tokens
from signround.config import ActScheme, Derivation, Method, QuantConfig, QuantScheme, Routing, StarvedExperts
from signround.errors import SignRoundError
from signround.model.blocks import check_finite, find_blocks, resolve_schemes
from signround.model.experts import RoutingTape, routed_tokens
from signround.model.lazy import BlockStream
from signround.pack.derive import served_at
from signround.pack.packed import QuantLinear
from signround.report import (
    BlockReport,
    RunReport,
    holdout_summary,
    native_bf16_cpu,
    peak_gpu_gb,
    peak_rss_gb,
    release_freed_memory,
)
from signround.runstate import RunState, fingerprint
from signround.tune.experts import starved, tune_alone
from signround.tune.rtn import tune_rtn
from signround.tune.search import search_block
from signround.tune.signround import (
    ActInputs,
    BlockData,
    BlockResult,
    LayerResult,
    TuneHooks,
    output_loss,
    tune_block,
)

log = logging.getLogger("signround")

# Steps between host reads of the tuning loss on an accelerator (each read waits for the device).
SYNC_EVERY_GPU = 10


@dataclass(frozen=True)
class RunOptions:
    """How a run executes; nothing here changes what it produces.

    Attributes:
        device: where blocks are tuned (``cpu``, ``cuda``, ``cuda:N``); None: CUDA when available, else CPU.
        progress: show progress bars.
        state_dir: a run folder where every finished block is persisted (see :mod:`signround.runstate`);
            the caller deletes it once the output is saved. Required by a streamed (``--low-memory``) run.
        resume: continue the interrupted run saved in ``state_dir``.
        block_parallel: in a torch.distributed run with ``cfg.tune.quant_inputs`` off, rank ``r`` tunes the
            blocks ``i % world == r`` and writes them to ``state_dir``; rank 0 gathers them (see
            :mod:`signround.dist`). Otherwise every rank tunes every block on its share of each batch.
    """

    device: str | None = None
    progress: bool = True
    state_dir: Path | None = None
    resume: bool = False
    block_parallel: bool = False


@dataclass
class _Run:
    """One run's context: the model's blocks and plans, where they run, the resume state, the report."""

    model: nn.Module
    cfg: QuantConfig
    dev: torch.device
    prefix: str
    blocks: nn.ModuleList
    plans: list[dict[str, QuantScheme]]
    options: RunOptions
    stream: BlockStream | None
    report: RunReport
    state: RunState | None = None
    parallel: bool = False  # block-parallel over more than one process
    # nested widths tuned on quantized inputs: {width: the inputs of the model served at that width}
    nested_inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        """Blocks are freed once persisted (``--low-memory``)."""
        return self.stream is not None and not self.stream.keep

    def load(self, i: int) -> tuple[nn.Module, torch.device]:
        """Block ``i`` moved to the tuning device (read from the shards first when streaming), and the device
        it goes back to once finished."""
        block = self.stream.materialize(i) if self.stream is not None else self.blocks[i]
        home = next(block.parameters()).device
        return block.to(self.dev), home

    def persist(self, i: int, block: nn.Module, fp_inputs: torch.Tensor | None, q_inputs: torch.Tensor | None) -> None:
        """Block ``i`` is final: keep it in the run folder (freeing a streamed block) and release memory."""
        if self.parallel:
            RunState.write_block(Path(self.options.state_dir), i, block)
        elif self.state is not None:
            report = dataclasses.asdict(self.report.blocks[-1])
            self.state.save_block(i, block, report, fp_inputs, q_inputs, self.nested_inputs)
            if self.streamed:
                self.stream.release(i, self.state.block_file(i))
        release_freed_memory()


def run(
    model: nn.Module,
    tokenizer: Any,
    cfg: QuantConfig,
    data: Any = None,
    options: RunOptions = RunOptions(),
    stream: BlockStream | None = None,
) -> RunReport:
    """Quantize ``model`` in place (its block linears become ``QuantLinear``) and return the report.

    Args:
        model: an HF causal LM in float precision, in eval mode.
        tokenizer: its tokenizer (used for calibration text).
        cfg: scheme, per-layer rules (the plan's included), tuning and calibration settings.
        data: calibration tokens ``[n, seqlen]``, a list of texts, or None to use ``cfg.calib.dataset``.
        options: device, progress, run folder, resume, block parallelism (:class:`RunOptions`).
        stream: the model came from :func:`signround.model.lazy.load_skeleton` (blocks on the meta device):
            each block is loaded before it is tuned and, with ``stream.keep`` off, freed once it is persisted
            in ``options.state_dir``; writers read the finished blocks back from there (``stream.packed``).
    """
    t0 = time.perf_counter()
    ctx = _start(model, cfg, options, stream)
    if cfg.needs_calibration:
        fp_inputs, q_inputs, kwargs = _calibrate(ctx, model, tokenizer, data)
        bar = _bar(ctx, "quantizing", initial=len(ctx.report.blocks))
        for i in range(len(ctx.report.blocks), len(ctx.blocks)):
            fp_inputs, q_inputs = _quantize_block(ctx, i, fp_inputs, q_inputs, kwargs[i], bar)
        bar.close()
        if ctx.parallel:
            ctx.report.blocks = _gather_blocks(ctx)
        if line := starved_summary(ctx.report, cfg.tune):
            log.info(line)
        if line := holdout_summary(ctx.report):
            log.info(line)
    else:
        _round_without_data(ctx)
    model.config.quantization_config = quantization_config(model, cfg, ctx.prefix, ctx.report)
    ctx.report.seconds = time.perf_counter() - t0
    ctx.report.peak_rss_gb = peak_rss_gb()
    ctx.report.peak_gpu_gb = peak_gpu_gb(ctx.dev)
    return ctx.report


def _start(model: nn.Module, cfg: QuantConfig, options: RunOptions, stream: BlockStream | None) -> _Run:
    """The run context: device, blocks and their per-layer schemes; refuses what cannot run."""
    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if stream is None:  # a streamed model's loader checks each tensor as it reads it (model.lazy)
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
    ctx = _Run(model, cfg, dev, prefix, blocks, plans, options, stream, RunReport())
    if options.block_parallel and (
        cfg.tune.quant_inputs or options.state_dir is None or options.resume or ctx.streamed
    ):
        raise SignRoundError(
            "block-parallel tuning needs blocks tuned on float inputs (--fp-inputs) and a run folder, and "
            "cannot resume or stream (--low-memory)"
        )
    if ctx.streamed and options.state_dir is None:
        raise SignRoundError("a streamed (--low-memory) run keeps its finished blocks in a run folder; give state_dir")
    ctx.parallel = options.block_parallel and dist.world()[1] > 1
    return ctx


def starved_summary(report: RunReport, tune: Any) -> str | None:
    """One line on the experts the calibration data barely reached (None for a model without experts)."""
    experts = sum(len(c) for b in report.blocks for c in (b.expert_tokens or {}).values())
    if not experts:
        return None
    hungry = [(b.index, s) for b in report.blocks for s in b.starved or []]  # (block, entry)
    if not hungry:
        return f"experts: all {experts} were routed at least {tune.expert_min_tokens} calibration tokens"
    what = {
        StarvedExperts.OWN: "each tuned alone on every calibration token",
        StarvedExperts.INIT: "each given the clipping search on every calibration token, no steps",
        StarvedExperts.BLOCK: "tuned with their blocks on the tokens they got",
    }[tune.starved_experts]
    if tune.iters == 0:
        what = "searched like every layer" if tune.method is Method.SEARCH else "rounded to nearest like every layer"
    block, fewest = min(hungry, key=lambda t: t[1]["tokens"])
    return (
        f"experts: {len(hungry)} of {experts} were routed fewer than {tune.expert_min_tokens} calibration tokens "
        f"(--expert-min-tokens), {what} (--starved-experts {tune.starved_experts}); fewest: "
        f"{fewest['module']}.{fewest['expert']} of block {block} with {fewest['tokens']}"
    )


def _bar(ctx: _Run, desc: str, initial: int = 0) -> tqdm:
    return tqdm(
        total=len(ctx.blocks), initial=initial, desc=desc, unit="block", disable=not ctx.options.progress,
        file=sys.stderr,
    )  # fmt: skip


def _round_without_data(ctx: _Run) -> None:
    """RTN with no calibration pass (as auto-round's ``iters=0``): every block rounded to nearest from its
    weights alone; the report has no block losses. A streamed block is loaded, rounded, persisted, freed.
    Rounding takes seconds per block, so a resumed streamed run starts over."""
    log.info("RTN: rounding weights to nearest; no calibration data is used")
    if ctx.streamed:
        shutil.rmtree(Path(ctx.options.state_dir), ignore_errors=True)
        no_tokens = torch.zeros(0, dtype=torch.long)
        ctx.state = RunState(Path(ctx.options.state_dir), fingerprint(_settings(ctx), no_tokens), False)
    nan = float("nan")
    for i in tqdm(range(len(ctx.blocks)), desc="rounding", unit="block", disable=not ctx.options.progress,
                  file=sys.stderr):  # fmt: skip
        t = time.perf_counter()
        block, home = ctx.load(i)
        _replace_linears(block, tune_rtn(block, None, ctx.plans[i], ctx.cfg.tune), ctx.cfg.act)
        block.to(home)
        ctx.report.blocks.append(BlockReport(i, f"{ctx.prefix}.{i}", nan, nan, nan, nan, 0, time.perf_counter() - t))
        if ctx.streamed:
            ctx.state.save_block(i, block, dataclasses.asdict(ctx.report.blocks[-1]), None, None)
            ctx.stream.release(i, ctx.state.block_file(i))
        release_freed_memory()


def _calibrate(
    ctx: _Run, model: nn.Module, tokenizer: Any, data: Any
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Calibration tokens, the run state (restoring the finished blocks of a resumed run) and the first
    unfinished block's float and quantized inputs with each block's call kwargs, on the tuning device."""
    options = ctx.options
    state_path = Path(options.state_dir) if options.state_dir is not None else None
    tokens = RunState.saved_tokens(state_path) if state_path is not None and options.resume else None
    if tokens is None:
        tokens = resolve_tokens(model, tokenizer, ctx.cfg.calib, data)
    if state_path is not None and dist.is_main():  # in a distributed run, rank 0 alone keeps the run state
        ctx.state = RunState(state_path, fingerprint(_settings(ctx), tokens), options.resume)
    if options.block_parallel:
        dist.barrier()  # the run folder exists before any rank writes a block into it
    inputs, _ = capture_block_inputs(model, ctx.blocks[0], tokens)
    kwargs = capture_block_kwargs(model, ctx.blocks, tokens[0])
    if not torch.isfinite(inputs).all():
        raise SignRoundError("the model's activations at the first block are not finite; check the model's weights")
    ctx.report.nsamples, ctx.report.seqlen = tokens.shape[0], tokens.shape[1]
    fp_inputs = q_inputs = inputs
    state = ctx.state
    if state is not None and state.done:
        log.info("resuming: %d of %d blocks were finished in %s", state.done, len(ctx.blocks), state.folder)
        for i in range(state.done):
            state.restore_block(i, ctx.blocks[i], ctx.cfg.act)  # the packed structure only, for a block on meta
            if ctx.streamed:
                ctx.stream.packed[i] = state.block_file(i)
            elif ctx.stream is not None:  # blocks loaded on demand: the finished ones come back whole
                state.load_block(i, ctx.blocks[i])
        ctx.report.blocks = [BlockReport(**r) for r in state.reports]
        fp_inputs, q_inputs, nested = state.load_inputs(_nested_widths(ctx))
        ctx.nested_inputs = {b: x.to(ctx.dev) for b, x in nested.items()}
    else:
        if state is not None:
            state.save_tokens(tokens)
        ctx.nested_inputs = {b: q_inputs.to(ctx.dev) for b in _nested_widths(ctx)}
    return fp_inputs.to(ctx.dev), q_inputs.to(ctx.dev), [to_device(k, ctx.dev) for k in kwargs]


def _quantize_block(
    ctx: _Run, i: int, fp_inputs: torch.Tensor, q_inputs: torch.Tensor, kwargs: dict[str, Any], bar: tqdm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets, tuning and finalizing of block ``i``; returns the next block's float and quantized inputs."""
    tune = ctx.cfg.tune
    block, home = ctx.load(i)
    tape = RoutingTape() if tune.routing is Routing.TEACHER else None
    with routed_tokens(block) as routed, tape.recording(block, fp_inputs.shape[1]) if tape else nullcontext():
        targets = _run_block(block, fp_inputs, kwargs, tune.batch_size)  # the float block routes the float inputs
    expert_tokens = {name: c.tolist() for name, c in routed.items()} or None
    if expert_tokens:
        least = min((min(c), name, c.index(min(c))) for name, c in expert_tokens.items())
        log.info("block %d: calibration tokens per expert %s; least: expert %d of %s with %d",
                 i, {n: c for n, c in expert_tokens.items()}, least[2], least[1], least[0])  # fmt: skip
    if not torch.isfinite(targets).all():
        raise SignRoundError(f"block {i} produced non-finite outputs on the calibration data; check the model")
    x = q_inputs if tune.quant_inputs else fp_inputs
    rank, size = dist.world()
    if ctx.parallel and i % size != rank:  # another rank tunes this block; the float chain goes on
        block.to(home)
        bar.update(1)
        return targets, targets
    data = BlockData(x, targets, kwargs, tuple(ctx.nested_inputs[b] for b in tune.nested) if ctx.nested_inputs else ())
    result, act, starved_report = _tune(ctx, i, block, data, fp_inputs, expert_tokens, tape)
    _replace_linears(block, result, act.scheme if act else None, act.scales if act else None)
    out = _run_block(block, x, kwargs, tune.batch_size)
    for b, xb in ctx.nested_inputs.items():  # each served width's model goes on from its own outputs
        with served_at(block, b, tune.derivation):
            ctx.nested_inputs[b] = _run_block(block, xb, kwargs, tune.batch_size)
    final = output_loss(out, targets, tune.loss, tune.batch_size)
    if result.steps == 0 and math.isnan(result.rtn_loss):  # plain RTN: its loss is the final one, measured above
        result = dataclasses.replace(result, rtn_loss=final, first_loss=final, best_loss=final, last_loss=final)
    fp_inputs = targets
    q_inputs = out if tune.quant_inputs else fp_inputs
    block.to(home)
    ctx.report.blocks.append(
        BlockReport(
            i, f"{ctx.prefix}.{i}", result.rtn_loss, result.first_loss, result.best_loss, final, result.steps,
            result.seconds, expert_tokens, starved_report, result.holdout,
        )
    )  # fmt: skip
    ctx.persist(i, block, fp_inputs, q_inputs)
    bar.set_postfix_str(f"loss rtn {result.rtn_loss:.3g} -> {final:.3g}")
    bar.update(1)
    log.info(
        "block %d/%d: loss rtn %.4g -> final %.4g (best step %.4g) in %.1f s",
        i + 1, len(ctx.blocks), result.rtn_loss, final, result.best_loss, result.seconds,
    )  # fmt: skip
    return fp_inputs, q_inputs


def _tune(
    ctx: _Run,
    i: int,
    block: nn.Module,
    data: BlockData,
    fp_inputs: torch.Tensor,
    expert_tokens: dict[str, list[int]] | None,
    tape: RoutingTape | None = None,
) -> tuple[BlockResult, ActInputs | None, list[dict[str, Any]] | None]:
    """Smoothing and static activation scales (when asked for), the starved experts alone (see
    :mod:`signround.tune.experts`), then the tuning function on block ``i``'s other layers (with ``tape``,
    the float model's routing replayed during its steps). Returns the
    result for every planned layer, the activation inputs and the starved experts' report entries."""
    cfg, tune = ctx.cfg, ctx.cfg.tune
    if cfg.smooth:
        alphas = smooth_block(block, data.inputs, data.targets, data.kwargs, ctx.plans[i], cfg.act, tune.batch_size)
        log.info("block %d smoothing alpha: %s", i, alphas)
    act = None
    if cfg.act is not None:
        scales = None
        if cfg.act.granularity.is_static:
            scales, clips = calibrate_static(block, data.inputs, data.kwargs, list(ctx.plans[i]), cfg.act,
                                             tune.batch_size)  # fmt: skip
            log.info("block %d activation clip ratios: %s", i, clips)
        act = ActInputs(cfg.act, scales)
    steps = tqdm(
        total=tune.iters, desc=f"block {i}", leave=False, disable=not ctx.options.progress or tune.iters == 0,
        file=sys.stderr,
    )  # fmt: skip

    def on_step(step: int, loss: float) -> None:
        steps.update(1)
        if step % 10 == 0:
            steps.set_postfix(loss=f"{loss:.4g}")

    hungry = starved(expert_tokens or {}, tune.expert_min_tokens)
    alone, entries = {}, None
    if hungry:
        entries = [
            {"module": m, "expert": e, "tokens": expert_tokens[m][e],
             "mode": tune.starved_experts.value if tune.iters > 0 else tune.method.value}
            for m, ids in hungry.items() for e in ids
        ]  # fmt: skip
        if tune.iters > 0 and tune.starved_experts is not StarvedExperts.BLOCK:
            alone = _tune_starved(ctx, i, block, fp_inputs, data.kwargs, entries, act)
    schemes = {n: s for n, s in ctx.plans[i].items() if n not in alone}
    tuner = tune_block if tune.iters > 0 else search_block if tune.method is Method.SEARCH else tune_rtn
    tuner = tuner if schemes else tune_rtn  # nothing left to tune: no steps
    with tape.replaying(block) if tape and tape.index else nullcontext():
        result = tuner(block, data, schemes, tune, tune.seed + i, act, _hooks(ctx, on_step, tape))
    result.layers.update(alone)
    steps.close()
    return result, act, entries


def _tune_starved(
    ctx: _Run,
    i: int,
    block: nn.Module,
    fp_inputs: torch.Tensor,
    kwargs: dict[str, Any],
    entries: list[dict[str, Any]],
    act: ActInputs | None,
) -> dict[str, LayerResult]:
    """Each starved expert of block ``i`` (``entries``) quantized alone on every calibration token's input to
    its experts module (captured from the float block on the float inputs); its report entry gets its own
    errors. Returns the results of its layers, named relative to the block."""
    tune = ctx.cfg.tune
    modules = sorted({e["module"] for e in entries})
    hidden = _experts_inputs(block, fp_inputs, kwargs, modules, tune.batch_size)
    plan = ctx.plans[i]
    out: dict[str, LayerResult] = {}
    for entry in entries:
        prefix = f"{entry['module']}.{entry['expert']}."
        schemes = {n[len(prefix) :]: s for n, s in plan.items() if n.startswith(prefix)}
        if not schemes:  # every layer of this expert is kept float by a rule
            continue
        scales = {n[len(prefix) :]: v for n, v in (act.scales or {}).items() if n.startswith(prefix)} if act else None
        expert_act = ActInputs(act.scheme, scales or None) if act is not None else None
        expert = block.get_submodule(prefix[:-1])
        res = tune_alone(expert, hidden[entry["module"]], schemes, tune, tune.seed + i, tune.starved_experts,
                         expert_act)  # fmt: skip
        entry.update(rtn_loss=res.rtn_loss, loss=res.last_loss, **({"holdout": res.holdout} if res.holdout else {}))
        out.update({prefix + n: layer for n, layer in res.layers.items()})
    return out


@torch.no_grad()
def _experts_inputs(
    block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], modules: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """``{experts module: [n, seqlen, H]}``: every token's hidden state entering each named experts module of
    the float ``block`` run on ``inputs`` ``[n, seqlen, hidden]`` (the router's input, before it picks)."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}

    def hook(name: str, args: tuple, kw: dict) -> None:
        seen[name].append((args[0] if args else kw["hidden_states"]).detach())

    handles = [
        block.get_submodule(m).register_forward_pre_hook(lambda _m, a, k, n=m: hook(n, a, k), with_kwargs=True)
        for m in modules
    ]
    try:
        _run_block(block, inputs, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    n, seqlen = inputs.shape[:2]
    return {m: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).reshape(n, seqlen, -1) for m, xs in seen.items()}


def _nested_widths(ctx: _Run) -> tuple[int, ...]:
    """The nested widths whose own model's inputs the run carries (only when tuning on quantized inputs)."""
    tune = ctx.cfg.tune
    return tune.nested if tune.quant_inputs and tune.iters > 0 else ()


def _hooks(ctx: _Run, on_step: Any, tape: RoutingTape | None = None) -> TuneHooks:
    """The tuning loop's host-read cadence, the routing replay's batch and, in a data-parallel run, its
    gradient reduction."""
    # the best-step pick must see each loss before the step changes the weights
    sync_every = SYNC_EVERY_GPU if ctx.dev.type != "cpu" and not ctx.cfg.tune.use_best else 1
    on_batch = None
    if tape is not None and tape.index:

        def on_batch(idx: torch.Tensor | None) -> None:
            tape.batch = idx

    if dist.world()[1] > 1 and not ctx.parallel:
        return TuneHooks(on_step, sync_every, shard=dist.shard, reduce=dist.all_reduce_sum, on_batch=on_batch)
    return TuneHooks(on_step, sync_every, on_batch=on_batch)


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
        carry_online(old, qlayer)
        setattr(parent, child, qlayer)


def _settings(ctx: _Run) -> dict[str, Any]:
    """What decides a run's result besides the calibration tokens (for resume fingerprints)."""
    return {"model": ctx.model.config.to_dict(), "cfg": dataclasses.asdict(ctx.cfg)}


def _gather_blocks(ctx: _Run) -> list[BlockReport]:
    """After a block-parallel loop: every rank's block reports (in block order), and on rank 0 the blocks
    that the other ranks tuned, read back from the run folder."""
    mine = ctx.report.blocks
    gathered: list[list[BlockReport] | None] = [None] * dist.world()[1]
    torch.distributed.all_gather_object(gathered, mine)  # also waits until every rank has written its blocks
    every = sorted((b for part in gathered for b in part or []), key=lambda b: b.index)
    if ctx.state is not None:
        own = {b.index for b in mine}
        for b in every:
            if b.index not in own:
                ctx.state.restore_block(b.index, ctx.blocks[b.index], ctx.cfg.act)
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
        "tuning": {"method": tune.method.value if tune.method is Method.SEARCH else "rtn", "iters": 0}
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
            "loss": tune.loss.value,
            "init": tune.init.value,
            **({"drop_outliers": tune.drop_outliers} if tune.drop_outliers else {}),
            **({} if tune.quant_inputs else {"quant_inputs": False}),
            **({"torch_compile": True} if tune.torch_compile else {}),
            "nsamples": report.nsamples,
            "seqlen": report.seqlen,
            "dataset": cfg.calib.dataset,
            **({"nested": list(tune.nested)} if tune.nested else {}),
            **(
                {
                    "expert_min_tokens": tune.expert_min_tokens,
                    "starved_experts": tune.starved_experts.value,
                    "routing": tune.routing.value,
                }
                if any(b.expert_tokens for b in report.blocks)
                else {}
            ),
        },
        **({"serve_bits": list(cfg.serve_bits)} if cfg.serve_bits else {}),
        # absent means shift (every checkpoint before the option), so shift checkpoints stay byte-identical
        **({"derivation": tune.derivation.value} if tune.derivation is not Derivation.SHIFT else {}),
        **({"activations": {**cfg.act.to_dict(), "smooth": cfg.smooth}} if cfg.act is not None else {}),
    }
