"""SignRound for one decoder block, as a pure function.

``tune_block`` learns, for every quantized linear of a block, a rounding offset per weight and min/max
clipping factors per group by signed gradient descent on the MSE between the quantized block's output
(on the quantized model's inputs) and the float block's output (on the float model's inputs, given as
``targets``). With ``iters == 0`` it is plain round-to-nearest (:func:`signround.tune.rtn.tune_rtn` is the
same result without calibration data). It knows nothing about devices, processes, files, logging or
progress bars: callers pass tensors, a config and a :class:`TuneHooks` object.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from signround.act.quant import quantized_inputs
from signround.calib.capture import block_output
from signround.config import ActScheme, Derivation, QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.formats.int_affine import compiled_fake_quant
from signround.model.blocks import block_linears
from signround.tune.init import InputPower, init_clipping
from signround.tune.optim import SignStepInBackward, linear_decay, sign_step
from signround.tune.wrapper import TunableWeight

StepCallback = Callable[[int, float], None]


@dataclass
class LayerResult:
    """One quantized linear: codes ``[out, in]`` uint8, scale/zero ``[out, groups]``, its scheme."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme


@dataclass
class BlockResult:
    """What tuning one block produced.

    Losses are :func:`token_errors` means (``cfg.loss``). ``rtn_loss`` is round-to-nearest's over all
    calibration samples (NaN when ``iters == 0``: the result *is* RTN, and the caller measures its loss
    once anyway); ``first_loss``, ``best_loss`` and ``last_loss`` are per-step (one random batch each)
    losses of the tuning run.
    """

    layers: dict[str, LayerResult]
    rtn_loss: float
    first_loss: float
    best_loss: float
    last_loss: float
    best_step: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    # TuneConfig.holdout > 0: {"samples": k, "start": loss, "tuned": loss, "kept_start": bool} on the held-out
    # samples, else None
    holdout: dict[str, Any] | None = None


def finalized(tunables: dict[str, TunableWeight]) -> dict[str, LayerResult]:
    """``{name: LayerResult}`` of each tunable's final codes, scale and zero point (:meth:`TunableWeight.finalize`)."""
    out = {}
    for name, t in tunables.items():
        codes, scale, zero = t.finalize()
        out[name] = LayerResult(codes=codes, scale=scale, zero=zero, scheme=t.scheme)
    return out


# A float output token whose mean square is below this counts as having mean square TINY_POWER.
TINY_POWER = 1e-6


def token_weights(target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token weights ``[..., seqlen]`` float32 of the tuning loss for float outputs ``target``
    ``[..., seqlen, hidden]``: 1 for ``mse``; for ``relative``, 1 over the token's mean square (computed
    without a full-size temporary)."""
    if loss != "relative":
        return torch.ones(target.shape[:-1], device=target.device)
    power = torch.linalg.vector_norm(target, dim=-1, dtype=torch.float32).square() / target.shape[-1]
    return 1.0 / power.clamp(min=TINY_POWER)


def drop_largest(sq: torch.Tensor, fraction: float) -> torch.Tensor:
    """``sq`` (squared errors, any shape) with its ``max(1, floor(fraction * numel))`` largest elements set to
    0 (ties at the cut all go), so they add nothing to the loss and get no gradient; ``fraction`` 0 returns
    ``sq`` itself. auto-round's outlier-suppressed loss (its ``enable_alg_ext`` path, below 4 bits)."""
    if fraction <= 0:
        return sq
    flat = sq.detach().reshape(-1)
    k = min(max(1, int(fraction * flat.numel())), flat.numel())
    cut = torch.topk(flat, k, sorted=False).values.min()
    return sq.masked_fill(sq.detach() >= cut, 0.0)


def token_errors(
    out: torch.Tensor,
    target: torch.Tensor,
    loss: str = "mse",
    weights: torch.Tensor | None = None,
    drop: float = 0.0,
) -> torch.Tensor:
    """Per-token error ``[..., seqlen]`` float32 of block outputs ``out`` against ``target`` (both
    ``[..., seqlen, hidden]``): the mean squared error over the hidden dimension, times
    :func:`token_weights` (pass ``weights`` precomputed to skip that). The tuning loss is the mean over
    tokens. ``drop``: the fraction of the largest squared errors of the whole tensor left out
    (:func:`drop_largest`; the mean still divides by the hidden width)."""
    err = drop_largest((out.float() - target.float()).pow(2), drop).mean(-1)
    return err * (token_weights(target, loss) if weights is None else weights)


def output_loss(out: torch.Tensor, targets: torch.Tensor, loss: str, batch_size: int) -> float:
    """Mean :func:`token_errors` of block outputs ``out`` against ``targets`` (``[n, seqlen, hidden]``),
    ``batch_size`` samples at a time (no full-size temporaries)."""
    total = 0.0
    for start in range(0, out.shape[0], batch_size):
        total += token_errors(out[start : start + batch_size], targets[start : start + batch_size], loss).sum().item()
    return total / targets[..., 0].numel()


def block_mse(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    weights: dict[str, torch.Tensor] | None = None,
    loss: str = "mse",
) -> float:
    """Mean over all samples' tokens of :func:`token_errors` of ``block`` (with ``weights`` substituted, if
    given): the mean squared error for ``loss == "mse"``."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size]
            out = block_output(functional_call(block, weights or {}, (x,), kwargs))
            total += token_errors(out, targets[start : start + batch_size], loss).sum().item()
    return total / targets[..., 0].numel()


def holdout_split(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool, held)``: sample indices ``[n - k]`` to draw tuning batches from and ``[k]`` held out, a seeded
    draw (its own generator, so the batches' stream is not shifted), each sorted."""
    if not 0 < k < n:
        raise SignRoundError(f"holdout {k} must leave at least one of the {n} calibration samples to tune on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return order[k:].sort().values, order[:k].sort().values


class BlockData(NamedTuple):
    """The tensors one block is tuned on.

    Attributes:
        inputs: ``[n, seqlen, hidden]`` inputs of the quantized model at this block.
        targets: ``[n, seqlen, hidden]`` outputs of the float block on the float model's inputs.
        kwargs: keyword arguments every call of the block needs (masks, positions), broadcastable.
        nested_inputs: with nested widths (``TuneConfig.nested``), the inputs ``[n, seqlen, hidden]`` of the
            model served at each of them, in ``cfg.nested``'s order: each width's loss is its block output
            on its own model's inputs. Empty: every width on ``inputs``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    kwargs: dict[str, Any]
    nested_inputs: tuple[torch.Tensor, ...] = ()


class ActInputs(NamedTuple):
    """Quantize the tuned linears' inputs in every forward: ``scheme``, and for static per-channel schemes
    the calibrated scales ``{name: [in]}`` (None for per-token scales)."""

    scheme: ActScheme
    scales: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class TuneHooks:
    """What the orchestrator decides for a tuning run, handed in as one object (the tuning math stays pure).

    Attributes:
        on_step: called as ``on_step(step, loss)`` for each step, in order, once its loss is read on the host.
        sync_every: read the losses on the host (a device synchronization) every this many steps (1: after
            every step; ``use_best`` needs 1). Results are the same either way; a non-finite loss is reported
            up to ``sync_every - 1`` steps late, naming its step.
        shard: data-parallel: this process's share of a batch's sample indices (None: one process).
        on_batch: called with each step's sample indices (this process's share) just before its forward, and
            with None once the steps are done (the pipeline's routing replay, :class:`RoutingTape`).
        reduce: data-parallel: sum a list of tensors over processes in place (None: one process).
            With ``shard`` and ``reduce`` each process back-propagates its share's error divided by the whole
            batch's size and the gradients are summed before the sign step, so every process ends equal.
    """

    on_step: StepCallback | None = None
    sync_every: int = 1
    shard: Callable[[torch.Tensor], torch.Tensor] | None = None
    reduce: Callable[[list[torch.Tensor]], None] | None = None
    on_batch: Callable[[torch.Tensor | None], None] | None = None

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise SignRoundError(f"sync_every must be >= 1, got {self.sync_every}")
        if (self.shard is None) != (self.reduce is None):
            raise SignRoundError("data-parallel tuning needs both shard and reduce")

    @property
    def data_parallel(self) -> bool:
        return self.reduce is not None


NO_HOOKS = TuneHooks()


def tune_block(
    block: nn.Module,
    data: BlockData,
    schemes: dict[str, QuantScheme],
    cfg: TuneConfig,
    seed: int,
    act: ActInputs | None = None,
    hooks: TuneHooks = NO_HOOKS,
) -> BlockResult:
    """Learn rounding and clipping for the linears of ``block`` named in ``schemes``.

    Args:
        block: the float decoder block (left unchanged).
        data: the block's quantized-model inputs, float targets and call kwargs (:class:`BlockData`).
        schemes: relative layer name -> scheme, for the layers to quantize.
        cfg: iterations, step sizes, batch size, best-vs-last.
        seed: seeds batch sampling (the pipeline passes ``cfg.seed + block index``).
        act: quantize the inputs of the tuned linears in every forward (the loss stays the error against the
            float block's ``targets``), so the weights adapt to the activation error.
        hooks: progress callback, host-read cadence and data-parallel reduction (:class:`TuneHooks`).

    Returns:
        A :class:`BlockResult` with codes, scales and zero points of each layer.
    """
    t0 = time.perf_counter()
    inputs, targets, kwargs = data.inputs, data.targets, data.kwargs
    if data.nested_inputs and len(data.nested_inputs) != len(cfg.nested):
        raise SignRoundError(f"{len(data.nested_inputs)} nested input tensors for the widths {cfg.nested}")
    width_inputs = [inputs, *data.nested_inputs] if data.nested_inputs else [inputs] * (len(cfg.nested) + 1)
    on_step, sync_every = hooks.on_step, hooks.sync_every
    linears = block_linears(block)
    learn = cfg.iters > 0
    keep_range = cfg.derivation is Derivation.RANGE
    tunables = {
        name: TunableWeight.from_linear(linears[name], s, learn, cfg.nested, keep_range) for name, s in schemes.items()
    }
    dtype = inputs.dtype
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": t.fake_quant_weight(dtype) for name, t in tunables.items()}

    def weight_sets() -> list[dict[str, torch.Tensor]]:
        """The substituted weights of each tuned width: the stored one, then ``cfg.nested``'s derived ones."""
        if not cfg.nested:
            return [weights()]
        per_layer = {name: t.nested_fake_quant_weights(dtype) for name, t in tunables.items()}
        return [{f"{name}.weight": ws[i] for name, ws in per_layer.items()} for i in range(len(cfg.nested) + 1)]

    stack = contextlib.ExitStack()
    try:
        act_scheme, act_scales = act if act is not None else (None, None)
        stack.enter_context(quantized_inputs(block, list(schemes), act_scheme, act_scales))
        power = InputPower()
        search = learn and cfg.init == "search"
        with torch.no_grad(), power.recording({n: linears[n] for n in schemes} if search else {}):
            rtn_loss = (
                block_mse(block, inputs, targets, kwargs, cfg.batch_size, weights(), cfg.loss) if learn else math.nan
            )
        if search:  # the RTN pass recorded each linear's input power: start from the best clipping for it
            init_clipping(tunables, power)
        coefs = [1.0]
        if learn and cfg.nested:  # each width weighted by one over its start loss (TuneConfig.nested)
            with torch.no_grad():
                starts = [block_mse(block, x, targets, kwargs, cfg.batch_size, w, cfg.loss)
                          for x, w in zip(width_inputs, weight_sets(), strict=True)]  # fmt: skip
            inverse = [1.0 / max(s, 1e-30) for s in starts]
            coefs = [c / sum(inverse) for c in inverse]

        def batch_loss(idx: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
            """The step's loss on samples ``idx``: the mean token error (or the error sum over ``denominator``),
            of each tuned width, weighted by ``coefs``."""
            total = None
            for coef, x, substituted in zip(coefs, width_inputs, weight_sets(), strict=True):
                with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    out = block_output(functional_call(block, substituted, (x[idx],), kwargs))
                err = token_errors(out, targets[idx], weights=per_token[idx], drop=cfg.drop_outliers or 0.0)
                part = err.mean() if denominator is None else err.sum() / denominator
                part = part if coef == 1.0 else part * coef
                total = part if total is None else total + part
            return total

        n = inputs.shape[0]
        pool, held = holdout_split(n, cfg.holdout, seed) if learn and cfg.holdout else (None, None)
        if held is not None:  # the start the steps must beat, on samples they never see
            start = {name: t.snapshot() for name, t in tunables.items()}
            with torch.no_grad():
                start_loss = block_mse(block, inputs[held], targets[held], kwargs, cfg.batch_size, weights(), cfg.loss)
        losses: list[float] = []
        holdout: dict[str, Any] | None = None
        best_loss, best_step, best_state = math.inf, -1, None
        pending: list[torch.Tensor] = []  # losses of steps not yet read on the host

        def record() -> None:
            """Read the pending steps' losses (one host sync for all of them), check them, track the best."""
            nonlocal best_loss, best_step, best_state
            values = torch.stack(pending).tolist()
            pending.clear()
            for step, value in enumerate(values, start=len(losses)):
                if not math.isfinite(value):
                    raise SignRoundError(
                        f"the tuning loss became {value} at step {step}; the inputs or weights are not finite "
                        "(try float32, or check the model)"
                    )
                losses.append(value)
                if value < best_loss:
                    best_loss, best_step = value, step
                    if cfg.use_best:  # its codes and clipping factors; skipped when the last step is kept
                        best_state = {name: t.snapshot() for name, t in tunables.items()}
                if on_step is not None:
                    on_step(step, value)

        if learn:
            per_token = token_weights(targets, cfg.loss)  # [n, seqlen], once per block
            gen = torch.Generator().manual_seed(seed)
            # every step's batch drawn up front and moved once: no host-to-device copy inside the loop
            m = n if pool is None else len(pool)
            batches = torch.stack([torch.randperm(m, generator=gen)[: cfg.batch_size] for _ in range(cfg.iters)])
            batches = batches if pool is None else pool[batches]
            batches = batches.to(inputs.device)
            if cfg.use_best and sync_every != 1:
                raise SignRoundError("use_best reads every step's loss before its update: sync_every must be 1")
            lr, mm_lr = cfg.effective_lr, cfg.effective_minmax_lr
            offsets = [v for t in tunables.values() for v in t.offsets]
            factors = [p for t in tunables.values() for p in (t.min_factor, t.max_factor)]
            # one process: each offset takes its sign step as soon as its gradient is ready (and frees it)
            in_backward = stack.enter_context(SignStepInBackward([] if hooks.data_parallel else offsets))
            stack.enter_context(compiled_fake_quant(cfg.torch_compile))  # the RTN pass and search stay eager
            for step in range(cfg.iters):
                idx = batches[step]
                if hooks.on_batch is not None:
                    hooks.on_batch(idx if not hooks.data_parallel else hooks.shard(idx))
                if not hooks.data_parallel:
                    loss = batch_loss(idx)
                    pending.append(loss.detach())
                else:  # data-parallel: this rank's share of the batch, gradients summed over ranks
                    loss = batch_loss(hooks.shard(idx), idx.numel() * targets[0, ..., 0].numel())
                    loss.backward()
                    total = loss.detach().reshape(1).clone()
                    hooks.reduce([p.grad for p in offsets + factors if p.grad is not None] + [total])
                    pending.append(total[0])
                if len(pending) >= sync_every:
                    record()
                step_lr = linear_decay(lr, step, cfg.iters)
                if not hooks.data_parallel:
                    in_backward.lr = step_lr
                    loss.backward()
                sign_step(offsets, step_lr)  # data-parallel: the summed gradients
                sign_step(factors, linear_decay(mm_lr, step, cfg.iters))
            if hooks.on_batch is not None:
                hooks.on_batch(None)
            if pending:
                record()
            if cfg.use_best and best_state is not None:
                for name, t in tunables.items():
                    t.restore(best_state[name])
            if held is not None:
                holdout = keep_better_start(block, tunables, start, start_loss, data, held, cfg)
        layers = finalized(tunables)
    finally:
        stack.close()
        for p in frozen:
            p.requires_grad_(True)
    return BlockResult(
        layers=layers,
        rtn_loss=rtn_loss,
        first_loss=losses[0] if losses else rtn_loss,
        best_loss=best_loss if losses else rtn_loss,
        last_loss=losses[-1] if losses else rtn_loss,
        best_step=best_step,
        steps=len(losses),
        seconds=time.perf_counter() - t0,
        losses=losses,
        holdout=holdout,
    )


def keep_better_start(
    block: nn.Module,
    tunables: dict[str, TunableWeight],
    start: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    start_loss: float,
    data: BlockData,
    held: torch.Tensor,
    cfg: TuneConfig,
) -> dict[str, Any]:
    """Score the tuned state (what :meth:`TunableWeight.finalize` would return) on the ``held`` samples; if
    it is not below ``start_loss`` (the start's score there), put every layer back to its ``start`` snapshot.
    Returns the block's ``holdout`` record."""
    inputs, targets, kwargs = data.inputs, data.targets, data.kwargs
    dtype = inputs.dtype
    tuned = {f"{name}.weight": t.current_weight(dtype) for name, t in tunables.items()}
    tuned_loss = block_mse(block, inputs[held], targets[held], kwargs, cfg.batch_size, tuned, cfg.loss)
    kept_start = not tuned_loss < start_loss
    if kept_start:
        for name, t in tunables.items():
            t.restore(start[name])
    return {"samples": len(held), "start": start_loss, "tuned": tuned_loss, "kept_start": kept_start}
