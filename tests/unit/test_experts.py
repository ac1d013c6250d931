"""Fused MoE experts -> one nn.Linear per expert (signround.model.experts), on tiny random-init models."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from signround.errors import SignRoundError
from signround.model.blocks import find_blocks
from signround.model.experts import (
    ExpertLayout,
    UnfusedExperts,
    UnfusedGptOssExperts,
    find_fused_experts,
    fuse_expert_tensors,
    split_expert_tensors,
    split_fused_state,
    unfuse_experts,
)

COMMON = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=320, num_experts_per_tok=2)
# Widths with 2*I != H and I != H (I = 48, H = 64), so a transposed or mis-split layout cannot pass by accident.
CONFIGS = {
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=48,
        num_experts=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "mixtral": dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_key_value_heads=2),
    "gpt_oss": dict(hidden_size=64, intermediate_size=48, num_local_experts=4, num_key_value_heads=2, head_dim=16),
    "olmoe": dict(hidden_size=64, intermediate_size=48, num_experts=4, num_key_value_heads=4),
    "deepseek_v3": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=48,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 is a dense MLP, layer 1 is MoE
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
}
MOE_LAYERS = {"deepseek_v3": [1]}  # the others: every layer
E, I, H = 4, 48, 64  # noqa: E741 (experts, expert width, hidden width: the docstrings' names)


def config(family: str):
    return AutoConfig.for_model(family, **COMMON, **CONFIGS[family])


def build(family: str, experts_implementation: str | None = None) -> nn.Module:
    """A seeded tiny model whose expert tensors and routers are re-randomized (init leaves some at zero)."""
    torch.manual_seed(0)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_config(config(family), **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.gate." in name or ".mlp.router." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def expected_linears(family: str, fused: dict[str, torch.Tensor], layer: int, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s nn.Linear tensors, indexed here independently of the module under test."""
    p = f"model.layers.{layer}.mlp.experts."
    gate_up, down = fused[p + "gate_up_proj"][e], fused[p + "down_proj"][e]
    if family != "gpt_oss":  # [2I, H] gate rows then up rows; down [H, I]
        return {"gate_proj.weight": gate_up[:I], "up_proj.weight": gate_up[I:], "down_proj.weight": down}
    bias = fused[p + "gate_up_proj_bias"][e]  # [H, 2I] interleaved columns; down [I, H]
    return {
        "gate_proj.weight": gate_up[:, 0::2].T,
        "up_proj.weight": gate_up[:, 1::2].T,
        "down_proj.weight": down.T,
        "gate_proj.bias": bias[0::2],
        "up_proj.bias": bias[1::2],
        "down_proj.bias": fused[p + "down_proj_bias"][e],
    }


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("implementation", ["eager", None])  # None: transformers' default (grouped_mm here)
def test_unfused_model_gives_the_same_logits(family, implementation):
    model = build(family, implementation)
    before = logits(model)
    names = unfuse_experts(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in MOE_LAYERS.get(family, [0, 1])]
    # Not bit-exact, even against the eager loop whose order route() follows: the fused forward applies the
    # activation to chunk()'s strided half of gate_up, and torch's SiLU takes another (vectorized vs not) path
    # on a strided tensor than on the contiguous gate_proj output: about 1 ulp (max |diff| ~2e-7 on logits ~0.6).
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_each_expert_is_three_linears_copied_exactly(family):
    model = build(family)
    fused = {k: v.clone() for k, v in model.state_dict().items()}
    unfuse_experts(model)
    modules = dict(model.named_modules())
    state = model.state_dict()
    assert not [k for k in state if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    assert find_fused_experts(model) == []
    kind = UnfusedGptOssExperts if family == "gpt_oss" else UnfusedExperts
    for layer in MOE_LAYERS.get(family, [0, 1]):
        assert type(modules[f"model.layers.{layer}.mlp.experts"]) is kind
        for e in range(E):
            for proj, shape in [("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))]:
                linear = modules[f"model.layers.{layer}.mlp.experts.{e}.{proj}"]
                assert type(linear) is nn.Linear and tuple(linear.weight.shape) == shape
                assert (linear.bias is not None) == (family == "gpt_oss")
            for key, want in expected_linears(family, fused, layer, e).items():
                got = state[f"model.layers.{layer}.mlp.experts.{e}.{key}"]
                assert torch.equal(got, want) and got.is_contiguous(), key
    # the rest of the model (attention, routers, shared experts, dense layer 0) is untouched
    rest = {k: v for k, v in fused.items() if ".mlp.experts." not in k}
    assert all(torch.equal(state[k], v) for k, v in rest.items())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_meta_skeleton_loaded_block_by_block_equals_unfusing_a_loaded_model(family):
    loaded = build(family)
    fused = {k: v.clone() for k, v in loaded.state_dict().items()}
    unfuse_experts(loaded)
    with init_empty_weights(include_buffers=False):  # as signround.model.lazy builds its skeleton
        skeleton = AutoModelForCausalLM.from_config(config(family)).eval()
    names = unfuse_experts(skeleton)
    assert names and all(p.device.type == "meta" for p in skeleton.parameters())
    prefix, blocks = find_blocks(skeleton)
    assert prefix == "model.layers"  # the per-expert lists are ModuleLists too, but smaller than the decoder
    outside = {k: v for k, v in fused.items() if not k.startswith(prefix + ".")}
    skeleton.load_state_dict(outside, strict=False, assign=True)
    for i, block in enumerate(blocks):  # keys relative to the block, as BlockStream.materialize reads them
        head = f"{prefix}.{i}."
        state = {k[len(head) :]: v for k, v in fused.items() if k.startswith(head)}
        result = block.load_state_dict(split_fused_state(block, state), strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys
    skeleton.tie_weights()
    assert not [n for n, p in skeleton.named_parameters() if p.device.type == "meta"]
    want, got = loaded.state_dict(), skeleton.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits(skeleton), logits(loaded))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fuse_inverts_split(family):
    model = build(family)
    fused = model.state_dict()
    layout = ExpertLayout.GPT_OSS if family == "gpt_oss" else ExpertLayout.OUTPUT_MAJOR
    split = dict(fused)
    for layer in MOE_LAYERS.get(family, [0, 1]):
        split = split_expert_tensors(f"model.layers.{layer}.mlp.experts", split, layout)
    assert split_expert_tensors("model.layers.1.mlp.experts", split, layout) == split  # per-expert keys pass
    back = dict(split)
    for layer in MOE_LAYERS.get(family, [0, 1]):
        back = fuse_expert_tensors(f"model.layers.{layer}.mlp.experts", back, layout)
    assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)
    assert all(back[k].shape == fused[k].shape and back[k].is_contiguous() for k in fused)
    unfuse_experts(model)  # and the module's own tensors fuse back to the original
    assert set(model.state_dict()) == set(split)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in split.items())


def test_dtype_and_requires_grad_are_kept():
    model = build("qwen3_moe").to(torch.bfloat16)
    want = model.model.layers[0].mlp.experts.gate_up_proj[2, I:].clone()
    unfuse_experts(model)
    up = model.model.layers[0].mlp.experts[2].up_proj.weight
    assert up.dtype == torch.bfloat16 and up.requires_grad and torch.equal(up, want)


def test_dense_model_is_untouched_and_an_unknown_experts_module_is_reported():
    cfg = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320
    )
    model = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert unfuse_experts(model) == [] and find_fused_experts(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class OtherExperts(nn.Module):  # a family this module does not know
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 2 * I, H))

    model.model.layers[1].mlp.experts = OtherExperts()
    model.model.layers[1].mlp.conv = nn.Conv1d(4, 4, 3)  # 3D weight, but not experts
    assert unfuse_experts(model) == []
    assert type(model.model.layers[1].mlp.experts) is OtherExperts
    assert find_fused_experts(model) == ["model.layers.1.mlp.experts"]


def test_fuse_refuses_incomplete_experts_and_biases_the_layout_lacks():
    w = {f"x.{e}.{p}.weight": torch.randn(I, H) for e in range(3) for p in ("gate_proj", "up_proj")}
    with pytest.raises(SignRoundError, match=r"x\.\{e\}\.up_proj\.weight is missing for experts \[1\] of 3"):
        fuse_expert_tensors("x", {k: v for k, v in w.items() if k != "x.1.up_proj.weight"}, ExpertLayout.OUTPUT_MAJOR)
    with pytest.raises(SignRoundError, match="must all be present"):
        fuse_expert_tensors("x", {k: v for k, v in w.items() if "up_proj" not in k}, ExpertLayout.OUTPUT_MAJOR)
    biased = {**w, **{f"x.{e}.{p}.bias": torch.randn(I) for e in range(3) for p in ("gate_proj", "up_proj")}}
    with pytest.raises(SignRoundError, match="layout has none"):
        fuse_expert_tensors("x", biased, ExpertLayout.OUTPUT_MAJOR)
    with pytest.raises(SignRoundError, match="has no biases"):
        split_expert_tensors("x", {"x.gate_up_proj_bias": torch.randn(3, 2 * I)}, ExpertLayout.OUTPUT_MAJOR)


def test_unfusing_frees_each_fused_layer_before_the_next_is_copied(monkeypatch):
    """Peak memory: a fused experts module is released as soon as its replacement is in place, so at most one
    layer's experts exist twice (on the upcycled 8-expert SmolLM2 the unfuse peak went from 7.97 GB to the
    6.18 GB of the load itself)."""
    import gc
    import weakref

    import signround.model.experts as experts

    model = build("qwen3_moe")
    done: list[weakref.ref] = []
    real = experts.unfused_from

    def watched(module, layout):
        gc.collect()
        assert all(ref() is None for ref in done), "an earlier fused experts module is still alive"
        done.append(weakref.ref(module))
        return real(module, layout)

    monkeypatch.setattr(experts, "unfused_from", watched)
    assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert len(done) == 2
