"""What every exporter of an HF-style folder shares: finding the quantized layers, the default scheme, and
writing a folder whose tensors and ``quantization_config`` replace the native ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.model.blocks import Planned
from signround.pack.packed import QuantLinear


def planned_from_model(model: nn.Module) -> list[Planned]:
    """The quantized layers of a model (none for a float model)."""
    return [
        Planned(n, m.scheme, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    ]


def model_act(model: nn.Module) -> ActScheme | None:
    """The activation scheme of the model's quantized layers (None: weights only); refuses a model whose
    quantized layers do not share one (signround gives every quantized layer the run's scheme)."""
    acts = {m.act for m in model.modules() if isinstance(m, QuantLinear)}
    if len(acts) > 1:
        names = sorted(a.name if a is not None else "A16" for a in acts)
        raise SignRoundError(
            f"the quantized layers mix activation schemes ({', '.join(names)}); the checkpoint is corrupt"
        )
    return acts.pop() if acts else None


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: QuantLinear}`` in model order; refuses a model with none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise SignRoundError("this model has no quantized layers; quantize it (or load a signround checkpoint) first")
    return layers


def native_config(model: nn.Module) -> dict[str, Any]:
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "signround":
        raise SignRoundError("this model was not quantized by signround; run signround.quantize first")
    return qc


def default_scheme(model: nn.Module) -> QuantScheme:
    """The run's default scheme (``quantization_config`` top level), against which overrides are listed."""
    qc = native_config(model)
    return QuantScheme.from_dict({k: qc[k] for k in ("bits", "group_size", "sym", "dtype") if k in qc})


def float_linears_in_blocks(model: nn.Module, block_prefix: str) -> list[str]:
    """Names of plain ``nn.Linear`` layers inside the decoder blocks (kept float by a per-layer rule)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(block_prefix + ".")]


def write_hf_folder(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    tensors: dict[str, dict[str, torch.Tensor]],
    quantization_config: dict[str, Any],
) -> None:
    """Save ``model`` as an HF folder in which each quantized layer ``name``'s own tensors are replaced by
    ``tensors[name]`` (``{suffix: tensor}``, stored as ``name.suffix``) and ``config.json`` carries
    ``quantization_config``. Every other tensor is saved as transformers saves it (sharded, tied weights once).
    """
    state = model.state_dict()
    for name in tensors:
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        for suffix, t in tensors[name].items():
            state[f"{name}.{suffix}"] = t.contiguous()
    native = model.config.quantization_config
    model.config.quantization_config = quantization_config
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        model.config.quantization_config = native
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
