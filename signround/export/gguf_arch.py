"""GGUF architectures: for each transformers family the GGUF exporter writes, llama.cpp's architecture name,
the config it can run, its metadata keys and its tensors (names, order, layout).

=============  =============  ==========================================================================
model_type     llama.cpp      what differs from ``llama``
=============  =============  ==========================================================================
``llama``      ``llama``      (the reference) ``attn_q`` / ``attn_k`` rows permuted to GGUF's rotary order
``qwen3``      ``qwen3``      NeoX rotary (rows in HF's order), per-head ``attn_q_norm`` / ``attn_k_norm``
``qwen3_moe``  ``qwen3moe``   as ``qwen3``; every layer a mixture of experts (below)
``gpt_oss``    ``gpt-oss``    NeoX rotary, attention biases, ``attn_sinks``, ``post_attention_norm``,
                              experts with biases, YaRN rotary scaling, alternating sliding-window layers
``mixtral``    ``llama``      LLaMA itself (permuted ``attn_q`` / ``attn_k``), every layer a mixture of experts:
                              ``llama.expert_count`` makes llama.cpp's ``llama`` graph load the experts of
                              ``feed_forward_length`` width; softmax routing, top-k renormalized (as Mixtral)
``olmoe``      ``olmoe``      NeoX rotary, ``attn_q_norm`` / ``attn_k_norm`` over the whole projection (not per
                              head), every layer a mixture of experts, top-k weights *not* renormalized,
                              ``output`` always written (the graph has no tied-embedding fallback)
=============  =============  ==========================================================================

Refused (:func:`arch_of`), because llama.cpp's graph would compute something else: Mixtral with a sliding
window; OLMoE with ``norm_topk_prob=True`` (its graph never renormalizes), ``clip_qkv``, attention biases or
fewer key/value heads than heads (``attn_k_norm`` is ``hidden_size`` wide); Qwen3-MoE without
``norm_topk_prob`` (its graph always renormalizes); and what the table's families do not have (rope scaling
other than gpt-oss's YaRN, activations other than SiLU).

Mixtures of experts. signround quantizes one ``nn.Linear`` per expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj``, :mod:`signround.model.experts`); llama.cpp stores
each projection of a layer as one 3-D tensor. With ``E`` experts, hidden width ``H`` and expert width ``I``:

================================  =============  =============  =================================
GGUF tensor                       torch shape    GGUF ``ne``    content
================================  =============  =============  =================================
``blk.{i}.ffn_gate_exps.weight``  ``[E, I, H]``  ``[H, I, E]``  expert ``e``'s ``gate_proj`` rows
``blk.{i}.ffn_up_exps.weight``    ``[E, I, H]``  ``[H, I, E]``  expert ``e``'s ``up_proj`` rows
``blk.{i}.ffn_down_exps.weight``  ``[E, H, I]``  ``[I, H, E]``  expert ``e``'s ``down_proj`` rows
``blk.{i}.ffn_gate_inp.weight``   ``[E, H]``     ``[H, E]``     the router, F32
================================  =============  =============  =================================

GGUF lists ``ne`` innermost first. Expert-major: the tensor is the experts' ``[out, in]`` weights stacked
in expert order (``torch.stack``, as :func:`signround.model.experts.fuse_expert_tensors` documents). A block
type is a per-row encoding, so the fused tensor's bytes are the experts' own rows, concatenated:
``uint8 [E, out, in / 32 * block_bytes]`` (``/ 256`` for a K-quant), every expert in the same GGUF type.
gpt-oss adds ``ffn_{gate,up,down}_exps.bias`` ``[E, I]``, ``[E, I]``, ``[E, H]`` and ``ffn_gate_inp.bias``
``[E]``, all F32. A float model whose experts are still transformers' fused modules is written the same way
(:func:`signround.model.experts.split_gate_up` gives the per-expert rows).

Tensors are produced here, encoded by the caller (:data:`Encode`), so that this module knows names and
layouts and :mod:`signround.export.gguf_export` knows blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from torch import nn

from signround.errors import SignRoundError
from signround.model.experts import (
    KNOWN_EXPERTS,
    ExpertLayout,
    UnfusedExperts,
    split_down,
    split_gate_up,
    split_gate_up_bias,
)

# (array, raw ggml type or None for a plain float array) for one linear's weight, rows reordered by perm
Encode = Callable[[nn.Module, str, "np.ndarray | None"], "tuple[np.ndarray, GGMLQuantizationType | None]"]
Tensor = tuple[str, np.ndarray, "GGMLQuantizationType | None"]


@dataclass(frozen=True)
class Arch:
    """One family, as llama.cpp's graph for it reads the file.

    ``name``: llama.cpp's ``general.architecture``; ``permute_qk``: llama.cpp wants LLaMA's rotary row order
    (NeoX-style families keep HF's); ``qk_norm``: per-head q/k RMS norms; ``experts``: the layout of its
    mixture of experts (None for a dense family), ``router`` the router module under ``mlp`` and
    ``expert_width`` the config field of the experts' width ``I``; ``ffn_norm``: the GGUF name of
    ``post_attention_layernorm``; ``sinks``: per-head attention sinks; ``rope``: the one rope type the graph
    applies (``"yarn"`` also writes the YaRN keys); ``sliding_window``: write the window size;
    ``output_required``: write ``output.weight`` even when tied to the embeddings (a graph without llama.cpp's
    fallback to ``token_embd``)."""

    model_type: str
    name: str
    permute_qk: bool = False
    qk_norm: bool = False
    experts: ExpertLayout | None = None
    router: str = "gate"
    expert_width: str = "moe_intermediate_size"
    ffn_norm: str = "ffn_norm"
    sinks: bool = False
    rope: str = "default"
    sliding_window: bool = False
    output_required: bool = False


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "llama", permute_qk=True),
    "qwen3": Arch("qwen3", "qwen3", qk_norm=True),
    "qwen3_moe": Arch("qwen3_moe", "qwen3moe", qk_norm=True, experts=ExpertLayout.OUTPUT_MAJOR),
    "gpt_oss": Arch(
        "gpt_oss", "gpt-oss", experts=ExpertLayout.GPT_OSS, router="router", expert_width="intermediate_size",
        ffn_norm="post_attention_norm", sinks=True, rope="yarn", sliding_window=True,
    ),
    "mixtral": Arch(
        "mixtral", "llama", permute_qk=True, experts=ExpertLayout.OUTPUT_MAJOR, expert_width="intermediate_size",
    ),
    "olmoe": Arch(
        "olmoe", "olmoe", qk_norm=True, experts=ExpertLayout.OUTPUT_MAJOR, expert_width="intermediate_size",
        output_required=True,
    ),
}  # fmt: skip
SUPPORTED = ", ".join(f"{a.model_type} ({a.name})" for a in ARCHS.values())
_GPT_OSS_ALPHA, _GPT_OSS_LIMIT = 1.702, 7.0  # the constants of llama.cpp's gpt-oss expert activation


def arch_of(model: Any) -> Arch:
    """The :class:`Arch` of ``model`` after checking its config is one llama.cpp runs as transformers does.

    Raises:
        SignRoundError: another family (DeepSeek-V3, ...), or a config option the
            architecture's llama.cpp graph does not have (the message names it).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        raise SignRoundError(
            f"gguf export supports {SUPPORTED} models; {model_type} is not supported yet "
            "(use --format native, gptq, auto_round or compressed-tensors)"
        )
    rope_type(config, arch)  # refuses a scaling llama.cpp's graph for this family does not apply
    if problem := _CONFIG_CHECKS[model_type](config):
        raise SignRoundError(f"gguf export of {arch.model_type} ({arch.name}): {problem}; use --format native instead")
    return arch


def _llama_problem(config: Any) -> str | None:
    act = getattr(config, "hidden_act", "silu")
    return None if act == "silu" else f"llama.cpp runs SiLU MLPs, this model uses {act}"


def _qwen3_problem(config: Any) -> str | None:
    if getattr(config, "attention_bias", False):
        return "llama.cpp's graph has no attention biases, this model has attention_bias=True"
    if getattr(config, "use_sliding_window", False):
        return "llama.cpp's graph has no sliding window, this model has use_sliding_window=True"
    return _llama_problem(config)


def _qwen3_moe_problem(config: Any) -> str | None:
    if not getattr(config, "norm_topk_prob", False):
        return "llama.cpp always renormalizes the top-k router weights; this model has norm_topk_prob=False"
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "every layer must be a mixture of experts (this model sets mlp_only_layers / decoder_sparse_step)"
    return _qwen3_problem(config)


def _gpt_oss_problem(config: Any) -> str | None:
    alpha = float(getattr(config, "swiglu_alpha", _GPT_OSS_ALPHA))
    limit = float(getattr(config, "swiglu_limit", _GPT_OSS_LIMIT))
    if (alpha, limit) != (_GPT_OSS_ALPHA, _GPT_OSS_LIMIT):
        return f"llama.cpp's experts use alpha {_GPT_OSS_ALPHA} and limit {_GPT_OSS_LIMIT}, this model {alpha}, {limit}"
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(int(config.num_hidden_layers))]
    if layer_types != expected:
        return (
            "llama.cpp alternates sliding-window and full attention layers, starting with sliding; this model does not"
        )
    return None


def _mixtral_problem(config: Any) -> str | None:
    window = getattr(config, "sliding_window", None)
    if window is not None:
        return f"llama.cpp's llama graph has no sliding window, this model has sliding_window={window}"
    return _llama_problem(config)


def _olmoe_problem(config: Any) -> str | None:
    if getattr(config, "norm_topk_prob", False):
        return "llama.cpp's olmoe graph never renormalizes the top-k router weights; this model has norm_topk_prob=True"
    clip = getattr(config, "clip_qkv", None)
    if clip is not None:
        return f"llama.cpp's olmoe graph does not clip q/k/v, this model has clip_qkv={clip}"
    if getattr(config, "attention_bias", False):
        return "llama.cpp's olmoe graph has no attention biases, this model has attention_bias=True"
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if kv_heads != heads:
        return (
            f"llama.cpp's olmoe graph norms keys over hidden_size and needs as many key/value heads as heads, "
            f"this model has {kv_heads} of {heads}"
        )
    return _llama_problem(config)


_CONFIG_CHECKS = {
    "llama": _llama_problem,
    "qwen3": _qwen3_problem,
    "qwen3_moe": _qwen3_moe_problem,
    "gpt_oss": _gpt_oss_problem,
    "mixtral": _mixtral_problem,
    "olmoe": _olmoe_problem,
}


def _rope_params(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    return {**(scaling if isinstance(scaling, dict) else {}), **(params if isinstance(params, dict) else {})}


def rope_type(config: Any, arch: Arch) -> str:
    """The model's rope type, refusing what llama.cpp's graph for ``arch`` does not apply: plain RoPE for
    the LLaMA (Mixtral), Qwen3 and OLMoE families, YaRN (gpt-oss's own) for gpt-oss."""
    params = _rope_params(config)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != arch.rope:
        wanted = "plain RoPE" if arch.rope == "default" else f"{arch.rope} RoPE"
        raise SignRoundError(f"gguf export of {arch.model_type} supports {wanted}; this model uses rope_type {kind!r}")
    return kind


def _rope_theta(config: Any) -> float:
    theta = _rope_params(config).get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


# ------------------------------------------------------------------------------------------- metadata


def add_metadata(writer: GGUFWriter, model: Any, arch: Arch, file_type: LlamaFileType) -> None:
    """The ``{arch}.*`` and ``general.*`` keys llama.cpp reads for ``arch`` (``writer`` was made for
    ``arch.name``). The LLaMA keys and their order are those of every earlier signround release."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "model"
    writer.add_name(Path(str(name)).name or "model")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))
    if arch.experts is not None:
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        writer.add_expert_feed_forward_length(int(getattr(config, arch.expert_width)))
    if arch.sliding_window:
        writer.add_sliding_window(int(config.sliding_window))
    if arch.rope == "yarn":
        rope = _rope_params(config)
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", 4096)))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)


# -------------------------------------------------------------------------------------------- tensors


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().astype(np.float16)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order turning HF's q/k layout into GGUF's LLaMA layout: ``new = old[perm]``.

    Row ``h*d + 2*j + t`` of the GGUF tensor (head ``h`` of size ``d``, pair ``j``, ``t`` in {0, 1}) is
    row ``h*d + t*d/2 + j`` of the HF one: each head's two rotary halves are interleaved.
    """
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _linear(get: Callable[[str], nn.Module], hf_name: str, gg: str, perm: np.ndarray | None,
            encode: Encode) -> Iterator[Tensor]:  # fmt: skip
    """A linear's weight (and bias, F32) as ``gg.weight`` / ``gg.bias``, rows reordered by ``perm``."""
    layer = get(hf_name)
    data, raw = encode(layer, hf_name, perm)
    yield f"{gg}.weight", data, raw
    if getattr(layer, "bias", None) is not None:
        bias = _f32(layer.bias)
        yield f"{gg}.bias", (bias[perm] if perm is not None else bias), None


def expert_names(prefix: str, count: int, proj: str) -> list[str]:
    """``{prefix}.{e}.{proj}`` for the experts ``0 .. count-1`` of one experts module."""
    return [f"{prefix}.{e}.{proj}" for e in range(count)]


def _fused_experts(module: nn.Module, layout: ExpertLayout) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """A float model's fused experts module -> ``(proj, F16 [E, out, in], F32 [E, out] bias or None)``."""
    gate, up = split_gate_up(module.gate_up_proj.data, layout)
    down = split_down(module.down_proj.data, layout)
    biases: tuple[Any, ...] = (None, None, None)
    if layout is ExpertLayout.GPT_OSS:
        gb, ub = split_gate_up_bias(module.gate_up_proj_bias.data)
        biases = (_f32(gb), _f32(ub), _f32(module.down_proj_bias.data))
    for proj, w, b in zip(_EXPERTS, (gate, up, down), biases, strict=True):
        yield proj, _f16(w), b


def _experts(get: Callable[[str], nn.Module], prefix: str, i: int, encode: Encode) -> Iterator[Tensor]:
    """``blk.{i}.ffn_{gate,up,down}_exps`` (module docstring) from the experts module ``prefix``."""
    module = get(prefix)
    if type(module) in KNOWN_EXPERTS:  # a float model not unfused (e.g. `signround export --format gguf:f16`)
        for proj, w, b in _fused_experts(module, KNOWN_EXPERTS[type(module)]):
            yield f"blk.{i}.{_EXPERTS[proj]}.weight", w, None
            if b is not None:
                yield f"blk.{i}.{_EXPERTS[proj]}.bias", b, None
        return
    if not isinstance(module, UnfusedExperts):
        raise SignRoundError(f"{prefix} is a {type(module).__name__}; gguf export expects experts there")
    for proj, gg in _EXPERTS.items():
        names = expert_names(prefix, len(module), proj)
        encoded = [encode(get(n), n, None) for n in names]
        types = {raw for _, raw in encoded}
        if len(types) > 1:  # the plan check refuses this before tuning; a hand-edited model gets here
            found = ", ".join(sorted("F16" if t is None else t.name for t in types))
            raise SignRoundError(
                f"{prefix}.{{e}}.{proj}: llama.cpp stores a layer's experts as one {gg} tensor of one type; "
                f"these experts are {found}; quantize every expert of a layer with the same scheme"
            )
        yield f"blk.{i}.{gg}.weight", np.stack([data for data, _ in encoded]), types.pop()
        if get(names[0]).bias is not None:
            yield f"blk.{i}.{gg}.bias", np.stack([_f32(get(n).bias) for n in names]), None


def _router(get: Callable[[str], nn.Module], name: str, i: int) -> Iterator[Tensor]:
    """The router ``[E, H]`` (and gpt-oss's bias ``[E]``) as ``blk.{i}.ffn_gate_inp``, F32 as llama.cpp keeps
    it. Routers are not ``nn.Linear`` modules in transformers 5 (``Qwen3MoeTopKRouter``, ``GptOssTopKRouter``,
    ``MixtralTopKRouter``, ``OlmoeTopKRouter``), so signround never quantizes them."""
    router = get(name)
    yield f"blk.{i}.ffn_gate_inp.weight", _f32(router.weight), None
    if getattr(router, "bias", None) is not None:
        yield f"blk.{i}.ffn_gate_inp.bias", _f32(router.bias), None


def tensors(model: Any, arch: Arch, encode: Encode) -> Iterable[Tensor]:
    """Every ``(gguf name, array, raw_dtype)`` of ``model``, in llama.cpp's order (the LLaMA order is that of
    every earlier signround release). ``encode`` turns one linear into its stored array. A head tied to the
    embeddings is left out (llama.cpp reads ``token_embd`` instead) unless ``arch.output_required``."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    get = model.get_submodule
    yield "token_embd.weight", _f16(get("model.embed_tokens").weight), None
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"blk.{i}.attn_norm.weight", _f32(get(f"{p}.input_layernorm").weight), None
        for hf, gg in _ATTN.items():
            perm = None
            if arch.permute_qk and hf in ("q_proj", "k_proj"):
                perm = rope_permutation(get(f"{p}.self_attn.{hf}").out_features, heads if hf == "q_proj" else kv_heads)
            yield from _linear(get, f"{p}.self_attn.{hf}", f"blk.{i}.{gg}", perm, encode)
        if arch.qk_norm:
            yield f"blk.{i}.attn_q_norm.weight", _f32(get(f"{p}.self_attn.q_norm").weight), None
            yield f"blk.{i}.attn_k_norm.weight", _f32(get(f"{p}.self_attn.k_norm").weight), None
        if arch.sinks:
            yield f"blk.{i}.attn_sinks.weight", _f32(get(f"{p}.self_attn").sinks), None
        if arch.experts is None:
            for hf, gg in _MLP.items():
                yield from _linear(get, f"{p}.mlp.{hf}", f"blk.{i}.{gg}", None, encode)
        else:
            yield from _router(get, f"{p}.mlp.{arch.router}", i)
            yield from _experts(get, f"{p}.mlp.experts", i, encode)
        yield f"blk.{i}.{arch.ffn_norm}.weight", _f32(get(f"{p}.post_attention_layernorm").weight), None
    yield "output_norm.weight", _f32(get("model.norm").weight), None
    head = model.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False) or head.weight is get("model.embed_tokens").weight
    if not tied or arch.output_required:
        data, raw = encode(head, "lm_head", None)
        yield "output.weight", data, raw
