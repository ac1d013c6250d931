"""signround: SignRound weight quantization for Hugging Face causal LMs.

Public API::

    from signround import QuantConfig, QuantScheme, W4A16, quantize
    qmodel = quantize(model, tokenizer, W4A16, dataset="calib.jsonl")      # a preset, a scheme or a config
    qmodel = quantize(model, tokenizer, QuantConfig(scheme=QuantScheme(bits=3), tune=TuneConfig(iters=50)))
    signround.save(qmodel, tokenizer, "out/w4g128")   # or qmodel.save_pretrained("out/w4g128")
    model, tokenizer = signround.load_model("out/w4g128")
    signround.perplexity(model, tokenizer, "wikitext2", seqlen=2048)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signround._version import __version__
from signround.config import (
    PRESETS,
    W2A16,
    W2A16G64,
    W3A16,
    W4A16,
    W8A16,
    ActScheme,
    CalibConfig,
    DType,
    ExportConfig,
    ExportFormat,
    LayerRule,
    Method,
    MixedSpec,
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
    "Allocation": "signround.mixed",
    "allocate_bits": "signround.mixed",
    "load_model": "signround.model.load",
    "RunReport": "signround.report",
    "RunOptions": "signround.pipeline",
    "run": "signround.pipeline",
    "Plan": "signround.plan",
    "make_plan": "signround.plan",
    "QuantResult": "signround.api",
    "quantize": "signround.api",
    "quantize_run": "signround.api",
}

if TYPE_CHECKING:
    from signround.api import QuantResult, quantize, quantize_run
    from signround.eval.harness import TaskScore, evaluate_tasks, format_scores
    from signround.eval.ppl import PplResult, perplexity
    from signround.mixed import Allocation, allocate_bits
    from signround.model.load import load_model
    from signround.pipeline import RunOptions, run
    from signround.plan import Plan, make_plan
    from signround.report import RunReport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'signround' has no attribute {name!r}")


def save(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    formats: str | Sequence[str] = "native",
    *,
    overwrite: bool = False,
    allow_partial_groups: bool = False,
) -> Path:
    """Write a quantized ``model`` (and ``tokenizer``) to ``path`` atomically, in one format or several
    (``"native,gptq,gguf:q4_0"``: one subfolder each); see :func:`signround.export.save`.
    ``allow_partial_groups`` lets compressed-tensors write groups that do not divide a layer's width."""
    from signround import export

    options = export.ExportOptions(allow_partial_groups=allow_partial_groups)
    return export.save(model, tokenizer, path, formats, overwrite=overwrite, options=options)


__all__ = [
    "PRESETS",
    "W2A16",
    "W2A16G64",
    "W3A16",
    "W4A16",
    "W8A16",
    "ExportConfig",
    "ExportFormat",
    "Plan",
    "QuantResult",
    "RunOptions",
    "make_plan",
    "quantize_run",
    "parse_layer_config",
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
