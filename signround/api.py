"""The one orchestrator: ``load -> plan -> calibrate -> tune block by block -> pack -> export``.

    from signround import QuantConfig, W4A16, quantize
    qmodel = quantize(model, tokenizer, QuantConfig(scheme=W4A16), dataset="calib.jsonl")

:func:`quantize_run` is the whole run, the function the command line calls too: the plan
(:func:`signround.plan.make_plan`: per-layer schemes, mixed precision, format search, the layer mix an
export format implies, the exporters' checks), then the block loop (:func:`signround.pipeline.run`), then
the plan's records in the checkpoint config. :func:`quantize` is its one-line form for a model in memory;
:func:`load_for_quantize` loads a model the way a run wants it (blocks read from the shards when their turn
comes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from signround import dist
from signround.config import QuantConfig, QuantScheme
from signround.errors import SignRoundError
from signround.model.experts import unfuse_experts
from signround.model.lazy import BlockStream, load_skeleton
from signround.model.load import load_model, read_quantization_config, resolve_model
from signround.model.rotate import rotate_model
from signround.pipeline import RunOptions, run
from signround.plan import Plan, make_plan
from signround.report import RunReport
from signround.runstate import RunState

log = logging.getLogger("signround")


@dataclass
class QuantResult:
    """A finished run: the quantized model (in place), what the plan decided and what the loop reported."""

    model: nn.Module
    tokenizer: Any
    plan: Plan
    report: RunReport

    def to_dict(self) -> dict[str, Any]:
        """The run report (``--report run.json``): time, peak memory, scheme, per-block losses, the plan's
        allocation or format choice."""
        r = self.report
        out: dict[str, Any] = {
            "seconds": r.seconds,
            "peak_rss_gb": r.peak_rss_gb,
            **({} if r.peak_gpu_gb is None else {"peak_gpu_gb": r.peak_gpu_gb}),
            "scheme": self.plan.config.scheme.name,
            "blocks": [vars(b) for b in r.blocks],
            "weights": self.plan.weights.to_dict(),
        }
        if self.plan.allocation is not None:
            out["mixed_precision"] = {
                **self.plan.allocation.to_config(),
                "sensitivity_seconds": self.plan.allocation.seconds,
            }
        if self.plan.format_choice is not None:
            out["format_search"] = self.plan.format_choice.to_config()
        return out


def as_config(config: QuantConfig | QuantScheme | str | None) -> QuantConfig:
    """A :class:`QuantConfig` from a config, a scheme, a preset name (``"W4A16"``) or None (W4G128 asym)."""
    if isinstance(config, QuantConfig):
        return config
    if config is None:
        return QuantConfig()
    return QuantConfig(scheme=config)


def quantize(
    model: nn.Module,
    tokenizer: Any,
    config: QuantConfig | QuantScheme | str | None = None,
    dataset: Any = None,
    options: RunOptions | None = None,
) -> nn.Module:
    """Quantize ``model``'s decoder-block linears in place with SignRound (or RTN) and return it.

    Args:
        model, tokenizer: an HF causal LM in float precision and its tokenizer.
        config: a :class:`QuantConfig` (scheme, per-layer rules, tuning, calibration, mixed precision, format
            search, activations, export formats to check), a :class:`QuantScheme`, a preset name
            (``"W4A16"``; see ``signround.PRESETS``) or None for W4G128 asymmetric with auto-round's defaults.
        dataset: calibration data: a file path (.txt/.jsonl/.json/.parquet) or HF dataset name (recorded as
            ``config.calib.dataset``), a list of texts, an int64 ``[n, seqlen]`` token tensor, or None for
            ``config.calib.dataset`` (None there too: data-free calibration from the model's own samples).
        options: device, progress bars, run folder and resume (:class:`RunOptions`).

    Returns:
        The same model object, with ``QuantLinear`` layers and ``config.quantization_config`` set;
        ``model.save_pretrained(path)`` or ``signround.save(model, tokenizer, path)`` writes a checkpoint.
    """
    return quantize_run(model, tokenizer, as_config(config), dataset, options).model


def quantize_run(
    model: nn.Module,
    tokenizer: Any,
    config: QuantConfig,
    dataset: Any = None,
    options: RunOptions | None = None,
    stream: BlockStream | None = None,
) -> QuantResult:
    """The whole run: plan, block loop, records (see the module docstring). ``stream`` is the block store of a
    model from :func:`load_for_quantize` (None for a model in memory); the other arguments are
    :func:`quantize`'s. A resumed run (``options.resume``) calibrates on the tokens its run folder saved."""
    options = options or RunOptions()
    unfused = unfuse_experts(model)  # fused 3-D experts -> one linear per expert (as auto-round)
    if unfused:
        log.info("mixture of experts: %d expert modules unfused into one linear per expert", len(unfused))
    data = None
    if isinstance(dataset, str):
        config = dataclasses.replace(config, calib=dataclasses.replace(config.calib, dataset=dataset))
    else:
        data = dataset
    if options.resume and options.state_dir is not None:
        saved = RunState.saved_tokens(Path(options.state_dir))
        data = saved if saved is not None else data
    rotation = None
    if config.rotate:  # deterministic for the seed, so a resumed run rotates its fresh float model the same way
        rotation = rotate_model(model, seed=config.tune.seed, mode=config.rotate)
        log.info("rotated: randomized Hadamard of the residual stream (%d) and of each head (%d)%s, seed %d",
                 rotation["residual"], rotation["head_dim"],
                 ", down_proj's input online" if rotation["online"] else "", rotation["seed"])  # fmt: skip
    plan = make_plan(model, tokenizer, config, data, progress=options.progress)
    if plan.tokens is not None:
        data = plan.tokens
    cfg = plan.config
    log.info("quantizing to %s with %s (%d iters)", cfg.scheme.name, cfg.tune.method.value, cfg.tune.iters)
    report = run(model, tokenizer, cfg, data, options, stream)
    model.config.quantization_config.update(plan.records())
    if rotation is not None:
        model.config.quantization_config["rotation"] = rotation
    return QuantResult(model, tokenizer, plan, report)


def needs_whole_model(config: QuantConfig) -> bool:
    """Whether planning or calibration runs the whole float model before the block loop (mixed precision,
    format search, calibration text generated by the model), so that it cannot be read block by block."""
    no_text = config.calib.dataset is None and config.needs_calibration
    return config.mixed is not None or bool(config.format_search) or no_text or config.rotate


def load_for_quantize(source: str, dtype: Any, low_memory: bool, config: QuantConfig) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, stream)`` for a quantize run. A float HF safetensors folder (the built-in alias
    included) is built on the meta device and each block read when its turn comes (``stream``; with
    ``low_memory`` it is also freed once persisted), so the run never holds the whole float model nor a
    memory map of it. Runs that need the whole model first (:func:`needs_whole_model`), other sources (GGUF,
    hub ids, checkpoints transformers converts) and quantized checkpoints load whole, as ``load_model`` does.

    Raises:
        SignRoundError: ``low_memory`` with what it cannot do (:func:`check_low_memory`), a bad source.
    """
    if low_memory:
        check_low_memory(config, source)
        return load_skeleton(resolve_model(source), dtype)
    folder = Path(resolve_model(source))
    on_demand = (
        not needs_whole_model(config)
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and read_quantization_config(folder) is None
    )
    if on_demand:
        try:
            return load_skeleton(folder, dtype, keep=True)
        except SignRoundError as exc:  # e.g. names transformers maps on load; its loader knows them
            log.debug("loading %s whole: %s", folder, exc)
    model, tokenizer = load_model(source, dtype=dtype)
    return model, tokenizer, None


def check_low_memory(config: QuantConfig, source: str) -> None:
    """Streaming (``--low-memory``) reads blocks from safetensors and writes the native format block by block.

    Raises:
        SignRoundError: another export format, a whole-model planning pass, or a ``.gguf`` source.
    """
    if [f.value for f in config.export.formats] != ["native"]:
        raise SignRoundError(
            "--low-memory writes the native format; drop --format and convert the checkpoint with "
            "`signround export --format ...` (it loads only the quantized model)"
        )
    if config.mixed is not None or config.format_search:
        raise SignRoundError(
            "--low-memory cannot run the whole-model sensitivity pass of --avg-bits/--target-size/"
            "--format-search; drop one of them"
        )
    if str(source).endswith(".gguf"):
        raise SignRoundError("--low-memory reads HF safetensors folders; convert the .gguf to a folder first")
    if config.rotate:
        raise SignRoundError("--rotate changes every weight of the float model at once; drop --low-memory or --rotate")


def join_distributed(config: QuantConfig, options: RunOptions, low_memory: bool) -> tuple[int, int]:
    """Join the torchrun process group, if any (``WORLD_SIZE`` > 1), and refuse what multi-process tuning does
    not support. Returns ``(rank, world size)``."""
    if not options.block_parallel and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    rank, size = dist.init_from_env()
    if options.block_parallel and size == 1:
        raise SignRoundError("--block-parallel splits blocks across processes; launch with torchrun --nproc_per_node N")
    if options.block_parallel and config.tune.quant_inputs:
        raise SignRoundError("--block-parallel needs blocks tuned on float inputs; add --fp-inputs")
    if size > 1 and (options.resume or low_memory):
        raise SignRoundError("multi-process tuning cannot --resume or stream (--low-memory) yet; run one process")
    batch = config.tune.batch_size
    if size > 1 and not options.block_parallel and batch < size:
        raise SignRoundError(f"--batch-size {batch} cannot be split over {size} processes; use >= {size}")
    return rank, size
