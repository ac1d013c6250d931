"""GPTQ-layout exports (``gptq``, ``auto_round``) of a mixture of experts, checked against the conventions of the
readers that serve them, on a tiny Qwen3-MoE whose widths are multiples of 32 (GPTQ packs 32 codes at a time).

- Names: one layer per expert, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.{qweight,qzeros,scales[,
  g_idx]}`` (what auto-round 0.16.1 writes, and what vLLM's ``FusedMoE.make_expert_params_mapping`` maps onto its
  fused parameters: ``experts.{e}.gate_proj.`` / ``up_proj.`` -> ``experts.w13_`` shards w1 / w3, ``down_proj.``
  -> ``experts.w2_``); the router stays a float ``mlp.gate.weight``.
- Shapes: stacked per expert as vLLM's loader does, they have the shapes ``GPTQMarlinMoEMethod.create_weights``
  allocates (``w13_qweight [E, H / pack, 2I]``, ``w2_qweight [E, I / pack, H]``, scales ``[E, groups, out]``, ...).
- Values: decoded here by a few lines written from the GPTQ layout (not signround's reader), they equal signround's
  dequantized weights exactly. signround's own reader (``load_model``) is also run; it is not a third party.
- Mixed widths: every expert of a layer shares one scheme, and the config names the layer the way vLLM resolves a
  ``FusedMoE`` (``get_dynamic_override(prefix)`` for ``gptq``; every ``extra_config`` entry under the prefix for
  auto-round); a layer whose experts differ is refused before tuning.

auto-round 0.16.1 itself (bench/.venv-bench) loads these exports on CPU with the same weights (measured for the
report, not here: auto-round is not a dependency of the test environment).
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import signround
from signround.config import ExportConfig, LayerRule, MixedSpec
from signround.errors import SignRoundError
from signround.model.load import load_model
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config

E, H, I, LAYERS, G = 4, 64, 64, 2, 16  # noqa: E741 (experts, hidden, expert width, layers, group size)
QUIET = signround.RunOptions(progress=False)
OSS_OTHERS = "--format gpt-oss-mxfp4 .*, gguf or native$"  # what a refused gpt-oss export is pointed to
PROJS = ("gate_proj", "up_proj", "down_proj")
X = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))


def build() -> torch.nn.Module:
    kw = dict(hidden_size=H, intermediate_size=128, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
              head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.gate." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def quantized(tokenizer, bits=4, sym=True, **fields):
    model = build()
    cfg = make_config(scheme=signround.QuantScheme(bits=bits, group_size=G, sym=sym), method="rtn", nsamples=4,
                      seqlen=32, **fields)  # fmt: skip
    signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    return model


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ bit streams, written from the layout: int32 words, little-endian, along ``dim`` (0 for qweight,
    1 for qzeros), element ``j`` at bits ``[b*j, b*j + b)`` of the stream; -> int64 codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = torch.stack([(w >> k) & 1 for k in range(32)], dim=dim + 1).flatten(dim, dim + 1)  # bit j*32+k
    n = stream.shape[dim] // bits
    shape = (n, bits, stream.shape[1]) if dim == 0 else (stream.shape[0], n, bits)
    bit_dim = 1 if dim == 0 else 2
    weights = (1 << torch.arange(bits)).reshape([-1 if d == bit_dim else 1 for d in range(3)])
    return (stream.reshape(shape) * weights).sum(bit_dim)


def vllm_expert_mapping(n_experts: int) -> list[tuple[str, str, int, str]]:
    """``FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
    ckpt_up_proj_name="up_proj", num_experts)`` as vLLM's qwen3_moe.py calls it: (param, weight name, expert,
    shard)."""
    return [
        ("experts.w13_" if proj != "down_proj" else "experts.w2_", f"experts.{e}.{proj}.", e, shard)
        for e in range(n_experts)
        for shard, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
    ]


def fuse_like_vllm(tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The layer's per-expert tensors placed as vLLM's loader places them: renamed by the mapping, w1 then w3
    along the output (last, ``is_transposed``) dimension of each expert's slice, experts stacked; ``g_idx``
    (per input) is one row per expert that w1 and w3 both write (``FusedMoE._load_g_idx``)."""
    shards: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if not name.startswith(f"model.layers.{layer}.mlp.experts."):
            continue
        for param, weight_name, expert, shard in vllm_expert_mapping(E):
            if weight_name in name:
                fused = name.replace(weight_name, param).rsplit(".", 1)[1]  # e.g. w13_qweight
                shards.setdefault(fused, {}).setdefault(expert, {})[shard] = t
                break
        else:
            raise AssertionError(f"{name} is not an expert tensor vLLM's mapping knows")
    out = {}
    for fused, per_expert in shards.items():
        parts = [[per_expert[e][s] for s in ("w1", "w3", "w2") if s in per_expert[e]] for e in range(E)]
        if parts[0][0].dim() == 1:
            assert all(torch.equal(p[0], p[-1]) for p in parts), fused
            out[fused] = torch.stack([p[0] for p in parts])
        else:
            out[fused] = torch.stack([torch.cat(p, dim=-1) for p in parts])
    return out


@pytest.mark.parametrize("fmt,sym", [("gptq", True), ("auto_round", True), ("auto_round", False)])
def test_moe_exports_follow_the_per_expert_conventions_and_decode_exactly(fmt, sym, tokenizer, tmp_path):
    model = quantized(tokenizer, bits=4, sym=sym)
    signround.save(model, tokenizer, tmp_path / fmt, fmt)
    tensors = load_file(str(tmp_path / fmt / "model.safetensors"))
    kinds = ("qweight", "qzeros", "scales") + (("g_idx",) if fmt == "gptq" else ())
    expected = {f"model.layers.{i}.mlp.experts.{e}.{p}.{k}" for i in range(LAYERS) for e in range(E) for p in PROJS
                for k in kinds}  # fmt: skip
    assert expected <= tensors.keys()
    assert not [k for k in tensors if "experts" in k and k not in expected]  # no fused or stray expert tensors
    for i in range(LAYERS):
        assert tensors[f"model.layers.{i}.mlp.gate.weight"].shape == (E, H)  # the router stays float
        assert tensors[f"model.layers.{i}.mlp.gate.weight"].is_floating_point()
    pack, zero_offset = 32 // 4, 1 if fmt == "gptq" else 0  # GPTQ v1 stores zero - 1
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for i in range(LAYERS):
        for e in range(E):
            for p in PROJS:
                name = f"model.layers.{i}.mlp.experts.{e}.{p}"
                out, inp = (H, I) if p == "down_proj" else (I, H)
                qw, qz, sc = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
                assert (qw.dtype, qz.dtype, sc.dtype) == (torch.int32, torch.int32, torch.float16)
                assert (qw.shape, qz.shape, sc.shape) == ((inp // pack, out), (inp // G, out // pack), (inp // G, out))
                if fmt == "gptq":
                    g_idx = tensors[f"{name}.g_idx"]
                    assert g_idx.dtype == torch.int32 and torch.equal(g_idx, torch.arange(inp, dtype=torch.int32) // G)
                codes, zeros = unpack(qw, 4, 0), unpack(qz, 4, 1) + zero_offset  # [in, out], [G, out]
                group = torch.arange(inp) // G
                weight = ((codes - zeros[group]).float() * sc.float()[group]).t()  # [out, in]
                assert torch.equal(weight, layers[name].dequantize(torch.float32)), name
        fused = fuse_like_vllm(tensors, i)  # shapes GPTQMarlinMoEMethod.create_weights allocates
        shapes = {k: tuple(v.shape) for k, v in fused.items()}
        assert shapes == {
            "w13_qweight": (E, H // pack, 2 * I),
            "w2_qweight": (E, I // pack, H),
            "w13_scales": (E, H // G, 2 * I),
            "w2_scales": (E, I // G, H),
            "w13_qzeros": (E, H // G, 2 * I // pack),
            "w2_qzeros": (E, I // G, H // pack),
            **({"w13_g_idx": (E, H), "w2_g_idx": (E, I)} if fmt == "gptq" else {}),
        }
    with torch.no_grad():  # signround's own reader (not third party) rebuilds the same model
        assert torch.equal(load_model(str(tmp_path / fmt))[0](X).logits, model(X).logits)


def vllm_dynamic_override(dynamic: dict, layer_name: str):
    """vLLM's ``gptq_utils.get_dynamic_override(config, layer_name)`` (key None): False for a negative match,
    the first positive match's dict, else None."""
    for pattern, values in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), layer_name):
                return False
        elif re.match(pattern.removeprefix("+:"), layer_name):
            return values
    return None


def gptq_bits(qc: dict, name: str) -> int:
    """The width a GPTQ reader gives ``name``: the checkpoint's, or its ``dynamic`` override's."""
    return (vllm_dynamic_override(qc.get("dynamic", {}), name) or {}).get("bits", qc["bits"])


def vllm_auto_round_moe_bits(qc: dict, prefix: str) -> int:
    """vLLM's ``INCConfigParser._resolve_raw`` for a ``FusedMoE``: every ``extra_config`` entry under the prefix
    must agree (else vLLM raises), none means the checkpoint's default."""
    found = {qc["extra_config"][n].get("bits", qc["bits"]) for n in qc.get("extra_config", {}) if n.startswith(prefix)}
    assert len(found) <= 1, f"vLLM refuses {prefix}: its experts disagree ({found})"
    return found.pop() if found else qc["bits"]


def test_a_mixed_moe_export_gives_each_layer_one_scheme_named_as_vllm_resolves_it(tokenizer, tmp_path):
    # Base 8 bits, options 4/8 (the widths vLLM's MoE kernels run): the experts land off the default width.
    model = quantized(tokenizer, bits=8, sym=True, mixed=MixedSpec(avg_bits=7.0, bit_options=(4, 8), nsamples=4))
    bits = {n: m.scheme.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(set(bits.values())) == 2, bits
    for fmt in ("gptq", "auto_round"):
        signround.save(model, tokenizer, tmp_path / fmt, fmt)
        qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        tensors = load_file(str(tmp_path / fmt / "model.safetensors"))
        for i in range(LAYERS):
            prefix = f"model.layers.{i}.mlp.experts"
            expert_bits = {bits[f"{prefix}.{e}.{p}"] for e in range(E) for p in PROJS}
            assert len(expert_bits) == 1  # the allocation's unit: the whole layer's experts
            (width,) = expert_bits
            if fmt == "gptq":
                assert gptq_bits(qc, prefix) == width  # what vLLM's FusedMoE gets
                assert all(gptq_bits(qc, f"{prefix}.{e}.{p}") == width for e in range(E) for p in PROJS)  # GPTQModel
                assert vllm_dynamic_override(qc["dynamic"], f"model.layers.{i}.mlp.gate") is False  # router float
            else:
                assert vllm_auto_round_moe_bits(qc, prefix) == width
            assert tensors[f"{prefix}.0.gate_proj.qweight"].shape == (H * width // 32, I)
        with torch.no_grad():
            assert torch.equal(load_model(str(tmp_path / fmt))[0](X).logits, model(X).logits), fmt


@pytest.mark.parametrize("fmt", ["gptq", "auto_round"])
def test_experts_of_one_layer_at_different_widths_are_refused_before_tuning(fmt, tokenizer):
    rule = LayerRule(r"^model\.layers\.1\.mlp\.experts\.2\.", signround.QuantScheme(bits=8, group_size=G, sym=True))
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=G, sym=True), iters=2, nsamples=4, seqlen=32,
                      layer_rules=(rule,), export=ExportConfig(formats=fmt))  # fmt: skip
    model = build()
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with pytest.raises(SignRoundError, match=r"model\.layers\.1\.mlp\.experts mixes W4G16sym, W8G16sym") as err:
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert "\n" not in str(err.value) and "--format native" in str(err.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was tuned
    assert torch.equal(model.model.layers[0].mlp.experts[0].gate_proj.weight, before[0, :I])


def test_mixtral_experts_take_each_readers_names(tokenizer, tmp_path):
    """``gptq``: the serving names (``signround.export.moe_names``; vLLM's Mixtral loader maps ``ckpt_gate_proj_name
    ="w1"``, ``"w3"`` up, ``"w2"`` down under ``block_sparse_moe``), config names included. ``auto_round``: what
    auto-round 0.16.1 writes and reads on transformers 5.24 (only the module renamed, ``gate_proj`` kept)."""
    kw = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_key_value_heads=2, num_hidden_layers=LAYERS,
              num_attention_heads=4, vocab_size=320, num_experts_per_tok=2)  # fmt: skip
    cfg = AutoConfig.for_model("mixtral", **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rule = LayerRule(r"\.experts\.", signround.QuantScheme(bits=8, group_size=G, sym=True))  # off the default width
    q = make_config(scheme=signround.QuantScheme(bits=4, group_size=G, sym=True), method="rtn", layer_rules=(rule,))
    signround.quantize(model, tokenizer, q, None, QUIET)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        expected = model(X).logits
    for fmt, names in (("gptq", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}), ("auto_round", None)):
        signround.save(model, tokenizer, tmp_path / fmt, fmt)
        reloaded, _ = load_model(str(tmp_path / fmt))  # signround's reader maps the serving names back
        with torch.no_grad():
            torch.testing.assert_close(reloaded(X).logits, expected, rtol=1e-5, atol=1e-5)
        tensors = load_file(str(tmp_path / fmt / "model.safetensors"))
        qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        assert not [k for k in tensors if ".mlp." in k]
        for i in range(LAYERS):
            assert f"model.layers.{i}.block_sparse_moe.gate.weight" in tensors
            for e in range(E):
                for p in PROJS:
                    stored = f"model.layers.{i}.block_sparse_moe.experts.{e}.{names[p] if names else p}"
                    assert {f"{stored}.{k}" for k in ("qweight", "qzeros", "scales")} <= tensors.keys()
            if fmt == "gptq":
                assert gptq_bits(qc, f"model.layers.{i}.block_sparse_moe.experts") == 8  # vLLM's FusedMoE prefix
                assert vllm_dynamic_override(qc["dynamic"], f"model.layers.{i}.block_sparse_moe.gate") is False
            else:  # auto-round's config names its own module tree (mlp.experts.{e}.gate_proj)
                assert vllm_auto_round_moe_bits(qc, f"model.layers.{i}.mlp.experts") == 8
        w1 = tensors["model.layers.1.block_sparse_moe.experts.2.w1.qweight"] if names else None
        if w1 is not None:  # w1 holds the gate projection's codes
            codes = unpack(w1, 8, 0).t()
            assert torch.equal(codes.to(torch.uint8), layers["model.layers.1.mlp.experts.2.gate_proj"].codes())


def test_experts_at_a_width_vllm_moe_kernels_do_not_run_are_warned_about(tokenizer, caplog):
    cfg = make_config(scheme=signround.QuantScheme(bits=3, group_size=G, sym=True), method="rtn",
                      export=ExportConfig(formats="gptq"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="signround"):
        signround.quantize(build(), tokenizer, cfg, None, QUIET)
    assert "gptq: MoE experts at 3 bits; vLLM's MoE kernels take 4 or 8 bits only" in caplog.text


@pytest.mark.parametrize("fmt", ["gptq", "auto_round"])
def test_gpt_oss_experts_are_refused_before_tuning(fmt, tokenizer):
    """No reader loads gpt-oss experts one linear per expert (vLLM reads fused or MXFP4 experts only; auto-round
    0.16.1 loads the tensors but its gpt-oss forward disagrees with the model's, measured for the report)."""
    kw = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_key_value_heads=2, num_hidden_layers=LAYERS,
              num_attention_heads=4, vocab_size=320, num_experts_per_tok=2, head_dim=16)  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **kw)).eval()
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=G, sym=True), method="rtn",
                      export=ExportConfig(formats=fmt))  # fmt: skip
    with pytest.raises(SignRoundError, match=f"{fmt} cannot store this gpt_oss mixture of experts.*{OSS_OTHERS}"):
        signround.quantize(model, tokenizer, cfg, None, QUIET)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
