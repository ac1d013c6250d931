"""The native signround checkpoint: an HF model folder whose quantized linears are stored packed.

``model.safetensors`` (sharded as transformers shards) holds every float tensor of the model unchanged
plus, for each quantized linear ``P``, ``P.qweight`` / ``P.scales`` / ``P.qzeros`` (asymmetric only) /
``P.bias`` (if any) as documented in :mod:`signround.pack.packed`. ``config.json`` carries
``quantization_config`` with ``quant_method: "signround"`` and the scheme of every quantized module.
See docs/checkpoint.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.export.moe_names import module_name
from signround.export.registry import Exporter, ExportFormat, ExportOptions, register_exporter
from signround.model.experts import unfuse_experts
from signround.model.lazy import BlockStream
from signround.model.rotate import attach_online
from signround.pack.packed import QuantLinear

log = logging.getLogger("signround")


def write_native(model: Any, tokenizer: Any, folder: Path, stream: BlockStream | None = None) -> None:
    """Write ``model`` (with ``QuantLinear`` layers and ``config.quantization_config``) into ``folder``; the
    blocks of a streamed run (``stream``, whose model holds none) block by block (:func:`write_streamed`)."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "signround":
        raise SignRoundError("this model was not quantized by signround; run signround.quantize first")
    if stream is not None:
        write_streamed(model, folder, stream)
    else:
        # tensors under the module tree's own names, as write_streamed and load_quantized use them (no revert
        # to a checkpoint layout transformers converts on load, e.g. Mixtral's block_sparse_moe)
        model.save_pretrained(folder, save_original_format=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_streamed(model: Any, folder: Path, stream: BlockStream) -> None:
    """Write a streamed (``--low-memory``) run's checkpoint one block at a time: shard 1 holds the tensors
    outside the blocks (a tied output head is stored once, as transformers does), shard ``i + 2`` block
    ``i``'s tensors read back from its run-state file; ``model.safetensors.index.json`` maps names to shards.
    Peak memory: one block."""
    prefix = stream.prefix
    n = len(stream.blocks)
    missing = [i for i in range(n) if i not in stream.packed]
    if missing:
        raise SignRoundError(f"blocks {missing[:3]} of this streamed run were not quantized; nothing to write")
    total = n + 1
    name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    size = 0
    seen: set[int] = set()
    outside = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + ".") or value.device.type == "meta" or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        outside[key] = value.detach().contiguous()
    shards = [(outside, name(1, total))] + [(None, name(i + 2, total)) for i in range(n)]
    for i, (tensors, file) in enumerate(shards):
        tensors = tensors if tensors is not None else stream.read_packed(i - 1)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = file
            size += value.numel() * value.element_size()
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


@register_exporter(ExportFormat.NATIVE)
class NativeExporter(Exporter):
    """signround's own checkpoint, the one format that stores activation quantization; a streamed run's
    blocks come from ``options.stream``."""

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_native(model, tokenizer, folder, options.stream)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SignRoundError(f"{folder} has no .safetensors weights; the checkpoint is incomplete")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise SignRoundError(f"cannot read {f.name}: {exc}; the checkpoint is corrupt") from None
    return state


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a quantized checkpoint as ``(model, tokenizer)`` with ``QuantLinear`` layers, in eval mode: a
    native one, or one that auto-round, GPTQ or compressed-tensors wrote (decoded by
    :mod:`signround.export.readers`)."""
    from signround.export.readers import replace_foreign_layers

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as exc:
        raise SignRoundError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None
    qc = config.quantization_config
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # a quantized mixture of experts is stored one linear per expert, as it was tuned
    try:
        fields = ("bits", "dtype", "granularity")
        record = qc.get("activations")
        act = ActScheme(**{k: record[k] for k in fields}, clip=record.get("clip", 1.0)) if record else None
    except (TypeError, KeyError):
        raise SignRoundError(
            f"cannot read the activation scheme {qc['activations']!r} in {folder}/config.json"
        ) from None
    for name, scheme_dict in qc.get("modules", {}).items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise SignRoundError(
                f"config lists module {name}, which the model does not have; config and weights mismatch"
            ) from None
        scheme = QuantScheme.from_dict(scheme_dict)
        layer = QuantLinear(old.in_features, old.out_features, scheme, old.bias is not None, dtype)
        layer.set_act(act)
        setattr(parent, child, layer)
    state = _state_dict(folder)
    if qc.get("quant_method") != "signround":
        # Foreign exports name experts as serving engines read them (Mixtral: block_sparse_moe.experts.{e}.w1).
        state = {module_name(config.model_type, k): v for k, v in state.items()}
        replace_foreign_layers(model, qc, state, config.model_type)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise SignRoundError(
            f"weights in {folder} do not fit its config ({str(exc).splitlines()[-1].strip()})"
        ) from None
    # A tied output head is saved once, as the input embedding; everything else must be present.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise SignRoundError(f"weights in {folder} do not fit its config: {what}")
    model.tie_weights()
    attach_online(model, qc.get("rotation"))  # down_proj's input rotation of `--rotate online`
    model.config.quantization_config = qc
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError):
        raise SignRoundError(f"{folder} has no tokenizer; save one beside the checkpoint") from None
    return model, tokenizer
