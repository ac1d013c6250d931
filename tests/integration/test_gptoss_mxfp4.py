"""gpt-oss written as its original checkpoints store it (``--format gpt-oss-mxfp4``, signround.export.mxfp4_gptoss):
MXFP4 expert blocks and scales, everything else float, on a tiny random gpt-oss. The names and shapes are the ones
transformers' MXFP4 experts module declares; transformers' own decoder of the blocks gives exactly signround's
expert weights; transformers loads the folder on CPU (its MXFP4 quantizer dequantizes there: no Triton kernels)
with signround's logits. vLLM is not installed here: its loader is not run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, convert_moe_packed_tensors
from transformers.quantizers.quantizers_utils import should_convert_module

import signround
from signround.cli import main
from signround.config import ExportConfig
from signround.errors import SignRoundError
from signround.export.mxfp4_gptoss import MODULES_TO_NOT_CONVERT
from signround.model.experts import ExpertLayout, join_down, join_gate_up
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config, make_model

E, H, I, LAYERS = 4, 64, 96, 2  # noqa: E741 (experts, hidden, expert width: I != H so a transpose cannot pass)
KW = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, num_hidden_layers=LAYERS,
          num_attention_heads=4, num_key_value_heads=2, vocab_size=320, head_dim=16)  # fmt: skip
FLOAT_ATTENTION = {"self_attn": {"bits": 16}}
MXFP4 = signround.QuantScheme(dtype="mxfp4", group_size=32)
QUIET = signround.RunOptions(progress=False)
FMT = "gpt-oss-mxfp4"


def build():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **KW)).eval()
    with torch.no_grad():  # init leaves the expert tensors and routers near zero
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.router." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def ids():
    return torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(quantized model, its folder in gpt-oss-mxfp4), tuned with SignRound, attention kept float."""
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    cfg = make_config(scheme=MXFP4, iters=2, nsamples=4, seqlen=32, batch_size=2, layer_config=FLOAT_ATTENTION,
                      export=ExportConfig(formats=FMT))  # fmt: skip
    model = signround.quantize(build(), tokenizer, cfg, corpus(20, seed=1), QUIET)
    folder = tmp_path_factory.mktemp("gptoss") / "mxfp4"
    signround.save(model, tokenizer, folder, FMT)
    return model, folder


def test_names_shapes_and_dtypes_are_the_original_checkpoints(exported):
    model, folder = exported
    t = tensors(folder)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **KW)).state_dict()
    fused = {k for k in reference if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    want = (set(reference) - fused) | {f"{k}_{s}" for k in fused for s in ("blocks", "scales")}
    assert set(t) == want  # transformers' gpt-oss names; no per-expert tensor
    with torch.device("meta"):  # the module transformers (kernel path) loads the blocks into
        mx = Mxfp4GptOssExperts(AutoConfig.for_model("gpt_oss", **KW))
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        shapes = {k: (tuple(t[p + k].shape), t[p + k].dtype) for k in
                  ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                   "gate_up_proj_bias", "down_proj_bias")}  # fmt: skip
        assert shapes == {
            "gate_up_proj_blocks": ((E, 2 * I, H // 32, 16), torch.uint8),
            "gate_up_proj_scales": ((E, 2 * I, H // 32), torch.uint8),
            "down_proj_blocks": ((E, H, I // 32, 16), torch.uint8),
            "down_proj_scales": ((E, H, I // 32), torch.uint8),
            "gate_up_proj_bias": ((E, 2 * I), torch.float32),
            "down_proj_bias": ((E, H), torch.float32),
        }
        assert t[p + "gate_up_proj_blocks"].flatten(-2).shape == mx.gate_up_proj.shape  # [E, 2I, H / 2]
        assert t[p + "down_proj_blocks"].flatten(-2).shape == mx.down_proj.shape  # [E, H, I / 2]
        assert t[p + "gate_up_proj_bias"].shape == mx.gate_up_proj_bias.shape
        assert t[p + "down_proj_bias"].shape == mx.down_proj_bias.shape
        # the float tensors are the model's own
        state = model.state_dict()
        for k in ("self_attn.q_proj.weight", "self_attn.sinks", "mlp.router.weight", "mlp.router.bias"):
            assert torch.equal(t[f"model.layers.{i}.{k}"], state[f"model.layers.{i}.{k}"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt_oss"
    assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    # transformers converts every experts module and none of the float ones under that list
    for i in range(LAYERS):
        assert should_convert_module(f"model.layers.{i}.mlp.experts", MODULES_TO_NOT_CONVERT)
        assert not should_convert_module(f"model.layers.{i}.self_attn", MODULES_TO_NOT_CONVERT)
        assert not should_convert_module(f"model.layers.{i}.mlp.router", MODULES_TO_NOT_CONVERT)
    assert (folder / "tokenizer.json").is_file()


def test_transformers_decodes_exactly_signrounds_expert_weights(exported):
    model, folder = exported
    t = tensors(folder)
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        experts = model.get_submodule(p[:-1])
        assert all(
            isinstance(getattr(x, n), QuantLinear) for x in experts for n in ("gate_proj", "up_proj", "down_proj")
        )

        def stack(proj, what, experts=experts):
            return torch.stack([getattr(getattr(x, proj), what)() for x in experts])

        gate_up = convert_moe_packed_tensors(
            t[p + "gate_up_proj_blocks"], t[p + "gate_up_proj_scales"], dtype=torch.float32
        )
        down = convert_moe_packed_tensors(t[p + "down_proj_blocks"], t[p + "down_proj_scales"], dtype=torch.float32)
        layout = ExpertLayout.GPT_OSS  # transformers' float gate_up_proj [E, H, 2I] (interleaved), down_proj [E, I, H]
        assert torch.equal(
            gate_up, join_gate_up(stack("gate_proj", "dequantize"), stack("up_proj", "dequantize"), layout)
        )
        assert torch.equal(down, join_down(stack("down_proj", "dequantize"), layout))
        # the bytes are our codes (no requantization): gate row j at 2j, up row j at 2j + 1, even column low
        blocks = t[p + "gate_up_proj_blocks"].flatten(-2)
        codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).flatten(-2)
        assert torch.equal(codes[:, 0::2], stack("gate_proj", "codes"))
        assert torch.equal(codes[:, 1::2], stack("up_proj", "codes"))
        assert torch.equal(t[p + "down_proj_scales"], torch.stack([x.down_proj.scales for x in experts]))


def test_transformers_loads_the_folder_with_signrounds_logits(exported):
    """On CPU transformers' Mxfp4HfQuantizer dequantizes the blocks into the float GptOssExperts (with or
    without ``dequantize=True``: its Triton kernels run on CPU only with ``use_kernels``)."""
    model, folder = exported
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32)  # fmt: skip
    assert type(loaded.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    with torch.no_grad():
        expected, got = model(ids()).logits, loaded(ids()).logits
    # not bit-exact: the fused forward's interleaved gate/up slices vs per-expert linears (about 1 ulp)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _quantize(model, tokenizer, **fields):
    cfg = make_config(method="rtn", export=ExportConfig(formats=FMT), **fields)
    return signround.quantize(model, tokenizer, cfg, None, QUIET)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(scheme=MXFP4), r"stores only the experts quantized, but model\.layers\.0\.self_attn\.q_proj and \d+ "
         r"more would be quantized; keep them float, e.g. attention with "
         r"--layer-config '\{\"self_attn\": \{\"bits\": 16\}\}'"),
        (dict(scheme=signround.QuantScheme(bits=4, group_size=32, sym=True), layer_config=FLOAT_ATTENTION),
         r"experts in MXFP4 blocks of 32; model\.layers\.0\.mlp\.experts\.0\.gate_proj is W4G32.*--data-type mxfp4 "
         r"--group-size 32"),
        (dict(scheme=MXFP4, layer_config={**FLOAT_ATTENTION, r"experts\.1\.down_proj": None}),
         r"every expert in MXFP4, but model\.layers\.0\.mlp\.experts\.1\.down_proj stays float"),
    ],
)  # fmt: skip
def test_what_the_layout_cannot_hold_is_refused_before_tuning(fields, match, tokenizer):
    model = build()
    with pytest.raises(SignRoundError, match=match):
        _quantize(model, tokenizer, **fields)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_a_model_that_is_not_gpt_oss_is_refused(tokenizer):
    model = make_model("llama")
    with pytest.raises(SignRoundError, match="gpt-oss-mxfp4 writes gpt-oss models only \\(this one is llama\\)"):
        _quantize(model, tokenizer, scheme=MXFP4)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_cli_quantizes_gpt_oss_to_the_mxfp4_layout(tokenizer, tmp_path):
    build().save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(12, seed=1)))
    argv = ["quantize", "--model", str(tmp_path / "float"), "--data-type", "mxfp4", "--group-size", "32",
            "--layer-config", json.dumps(FLOAT_ATTENTION), "--format", FMT, "--iters", "2", "--nsamples", "4",
            "--seqlen", "32", "--batch-size", "2", "--dataset", str(tmp_path / "calib.jsonl"), "--quiet",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    t = tensors(tmp_path / "out")
    assert t["model.layers.1.mlp.experts.down_proj_blocks"].shape == (E, H, I // 32, 16)
    assert not [k for k in t if ".experts.0." in k]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(loaded(ids()).logits).all()


def test_a_native_checkpoint_converts_to_the_same_folder(exported, tokenizer, tmp_path):
    """``signround export --format gpt-oss-mxfp4`` of the run's native checkpoint writes the same tensors."""
    model, folder = exported
    signround.save(model, tokenizer, tmp_path / "native")
    assert main(["export", "--model", str(tmp_path / "native"), "--format", FMT, "--output", str(tmp_path / "out"),
                 "--quiet"]) == 0  # fmt: skip
    converted, direct = tensors(tmp_path / "out"), tensors(folder)
    assert converted.keys() == direct.keys()
    assert all(torch.equal(converted[k], direct[k]) for k in direct)
