"""signround: SignRound weight quantization for Hugging Face causal LMs.

Public API::

    from signround import quantize, QuantScheme
    qmodel = quantize(model, tokenizer, scheme=QuantScheme(bits=4, group_size=128), dataset="calib.jsonl")
    qmodel.save_pretrained("out/w4g128")          # or signround.save(qmodel, tokenizer, "out/w4g128")
    model, tokenizer = signround.load_model("out/w4g128")
    signround.perplexity(model, tokenizer, "wikitext2", seqlen=2048)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from signround._version import __version__
from signround.config import (
    ActScheme,
    CalibConfig,
    DType,
    LayerRule,
    Method,
    QuantConfig,
    QuantScheme,
    TuneConfig,
    parse_layer_config,
)
from signround.errors import SignRoundError

# The heavier parts (pipeline, evaluation, exporters, the MILP allocator) load on first use, so a process
# that imports one module of signround does not pay for all of them (about 140 MB of RSS: scipy, gguf, ...).
_LAZY = {
    "TaskScore": "signround.eval.harness",
    "evaluate_tasks": "signround.eval.harness",
    "format_scores": "signround.eval.harness",
    "PplResult": "signround.eval.ppl",
    "perplexity": "signround.eval.ppl",
    "save": "signround.export",
    "Allocation": "signround.mixed",
    "MixedSpec": "signround.mixed",
    "allocate_bits": "signround.mixed",
    "load_model": "signround.model.load",
    "RunReport": "signround.pipeline",
    "run": "signround.pipeline",
}

if TYPE_CHECKING:
    from signround.eval.harness import TaskScore, evaluate_tasks, format_scores
    from signround.eval.ppl import PplResult, perplexity
    from signround.export import save
    from signround.mixed import Allocation, MixedSpec, allocate_bits
    from signround.model.load import load_model
    from signround.pipeline import RunReport, run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'signround' has no attribute {name!r}")


PRESETS: dict[str, QuantScheme] = {
    "W4A16": QuantScheme(bits=4, group_size=128, sym=True),
    "W3A16": QuantScheme(bits=3, group_size=128, sym=True),
    "W2A16": QuantScheme(bits=2, group_size=128, sym=True),
    "W2A16G64": QuantScheme(bits=2, group_size=64, sym=True),
    "W8A16": QuantScheme(bits=8, group_size=128, sym=True),
}


def quantize(
    model: Any,
    tokenizer: Any,
    scheme: QuantScheme | str | None = None,
    dataset: Any = None,
    iters: int = 200,
    nsamples: int = 128,
    seqlen: int = 2048,
    batch_size: int = 8,
    lr: float | None = None,
    minmax_lr: float | None = None,
    seed: int = 42,
    method: str = "signround",
    layer_config: dict | str | None = None,
    mixed: MixedSpec | None = None,
    serve_bits: Any = None,
    format_search: Any = None,
    act: ActScheme | None = None,
    smooth: bool = False,
    amp: bool = False,
    loss: str = "relative",
    init: str = "search",
    use_best: bool = True,
    enable_torch_compile: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> Any:
    """Quantize ``model``'s decoder-block linears in place with SignRound (or RTN) and return it.

    Args:
        model, tokenizer: an HF causal LM in float precision and its tokenizer.
        scheme: a :class:`QuantScheme`, a preset name from ``PRESETS``, or None for W4G128 asymmetric.
        dataset: calibration data: a file path (.txt/.jsonl/.json/.parquet), an HF dataset name, a list
            of texts, an int64 ``[n, seqlen]`` token tensor, or None for data-free calibration.
        iters: SignRound steps per block (0 = RTN). lr / minmax_lr default to 1/iters.
        nsamples, seqlen, batch_size, seed: calibration and sampling settings (auto-round's defaults).
        method: ``"signround"`` or ``"rtn"``.
        layer_config: per-layer overrides ``{regex: {"bits": 8}}`` (``None`` value keeps a layer float).
        mixed: a :class:`MixedSpec` (e.g. ``MixedSpec(avg_bits=3.0, bit_options=(2, 3, 4, 8))``) to choose
            each layer's bits for a size budget; ``scheme`` then gives the group size and symmetry, and the
            allocation is recorded in ``config.quantization_config["mixed_precision"]``.
        serve_bits: Double Rounding: lower widths (e.g. ``(6, 4, 3, 2)``) this checkpoint also serves,
            recorded in ``quantization_config["serve_bits"]``; ``load_model(path, bits=4)`` derives them.
        format_search: data types of one width (``"fp4_e2m1,fp4_e1m2,fp4_e3m0"`` or a sequence); each layer
            gets the one of least activation-weighted rounding error (LLM-FP4's format search), recorded in
            ``config.quantization_config["format_search"]``.
        act: an :class:`ActScheme` to quantize every quantized linear's input (fake-quant), e.g.
            ``ActScheme(bits=8)``; SignRound then tunes the weights with quantized inputs.
        smooth: with ``act``, fold searched per-channel smoothing scales into the norms / up_proj first.
        amp: tuning steps under bfloat16 autocast (matmuls in bfloat16, everything else float32).
        loss: ``relative`` (per-token error relative to the float output's power; default) or ``mse``
            (auto-round's objective); see :class:`TuneConfig`.
        init: ``search`` (clipping factors start at a grid search weighted by the inputs' power; default)
            or ``none`` (unclipped, as auto-round).
        use_best: keep each block's lowest-batch-loss step (auto-round's rule; default), else its last step.
        enable_torch_compile: compile the tuning steps' quantize-dequantize (``TuneConfig.torch_compile``).
        device: where blocks are tuned (default CUDA if available).

    Returns:
        The same model object, with ``QuantLinear`` layers and ``config.quantization_config`` set;
        ``model.save_pretrained(path)`` writes a native signround checkpoint.
    """
    if scheme is None:
        scheme = QuantScheme()
    if isinstance(scheme, str):
        if scheme not in PRESETS:
            raise SignRoundError(f"unknown preset {scheme!r}; choose one of {', '.join(PRESETS)}")
        scheme = PRESETS[scheme]
    text_dataset = dataset if isinstance(dataset, str) else None
    cfg = QuantConfig(
        scheme=scheme,
        layer_rules=parse_layer_config(layer_config, scheme),
        tune=TuneConfig(
            method=method,
            iters=iters,
            lr=lr,
            minmax_lr=minmax_lr,
            batch_size=batch_size,
            use_best=use_best,
            seed=seed,
            amp=amp,
            loss=loss,
            init=init,
            torch_compile=enable_torch_compile,
        ),
        calib=CalibConfig(dataset=text_dataset, nsamples=nsamples, seqlen=seqlen, seed=seed),
        serve_bits=serve_bits,
        act=act,
        smooth=smooth,
    )
    data = None if text_dataset is not None else dataset
    alloc = None
    if mixed is not None:
        from signround.pipeline import resolve_tokens

        data = resolve_tokens(model, tokenizer, cfg.calib, data)
        from signround.mixed import allocate_bits

        alloc = allocate_bits(model, data, cfg, mixed, progress=progress)
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + alloc.rules())
    choice = None
    if format_search is not None:
        from signround.mixed.formats import choose_formats, parse_candidates
        from signround.pipeline import resolve_tokens

        candidates = parse_candidates(format_search, scheme)
        data = resolve_tokens(model, tokenizer, cfg.calib, data)
        choice = choose_formats(model, data, candidates)
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + choice.rules())
    from signround.pipeline import run

    run(model, tokenizer, cfg, data=data, device=device, progress=progress)
    if alloc is not None:
        model.config.quantization_config["mixed_precision"] = alloc.to_config()
    if choice is not None:
        model.config.quantization_config["format_search"] = choice.to_config()
    return model


__all__ = [
    "PRESETS",
    "ActScheme",
    "CalibConfig",
    "DType",
    "LayerRule",
    "Method",
    "MixedSpec",
    "Allocation",
    "PplResult",
    "QuantConfig",
    "QuantScheme",
    "RunReport",
    "SignRoundError",
    "TaskScore",
    "TuneConfig",
    "__version__",
    "allocate_bits",
    "evaluate_tasks",
    "format_scores",
    "load_model",
    "perplexity",
    "quantize",
    "run",
    "save",
]
