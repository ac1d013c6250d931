"""End to end on tiny random-init models of three families: quantize, save, reload, evaluate."""

import json

import pytest
import torch

import signround
from signround.export.native import load_quantized
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config, make_model, quantize_tiny

QUIET = signround.RunOptions(progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_save_reload_same_logits(family, sym, tokenizer, tmp_path):
    model = make_model(family)
    float_logits_input = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    cfg = make_config(scheme=signround.QuantScheme(bits=3, group_size=48, sym=sym), iters=8, nsamples=8, seqlen=32,
                      batch_size=4)  # fmt: skip
    qmodel = signround.quantize(model, tokenizer, cfg, corpus(40, seed=1), QUIET)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == (12 if family == "opt" else 14)
    with torch.no_grad():
        expected = qmodel(float_logits_input).logits
    out = signround.save(qmodel, tokenizer, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "signround" and qc["bits"] == 3 and qc["sym"] is sym
    assert len(qc["modules"]) == len(layers)
    reloaded, tok = load_quantized(out)
    with torch.no_grad():
        got = reloaded(float_logits_input).logits
    assert torch.equal(got, expected)
    # and through the generic loader too
    again, _ = signround.load_model(str(out))
    assert isinstance(again.get_submodule(next(iter(qc["modules"]))), QuantLinear)


def test_save_pretrained_of_the_returned_model_is_a_checkpoint(tokenizer, tmp_path):
    qmodel = quantize_tiny(tokenizer)
    qmodel.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    reloaded, _ = load_quantized(tmp_path / "hf")
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, qmodel(x).logits)


def test_layer_config_and_rtn(tokenizer):
    cfg = make_config(
        scheme=signround.QuantScheme(bits=4, group_size=32), method="rtn", nsamples=4, seqlen=32,
        layer_config={r"mlp\.down_proj": {"bits": 8}, r"self_attn\.o_proj": None},
    )  # fmt: skip
    qmodel = signround.quantize(make_model("llama"), tokenizer, cfg, corpus(40, seed=1), QUIET)
    qc = qmodel.config.quantization_config
    assert qc["tuning"]["iters"] == 0
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert "model.layers.0.self_attn.o_proj" not in qc["modules"]
    assert isinstance(qmodel.model.layers[0].self_attn.o_proj, torch.nn.Linear)


def test_data_free_calibration_generates_text(tokenizer, caplog):
    caplog.set_level("INFO", logger="signround")
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=32), iters=2, nsamples=4, seqlen=16)
    signround.quantize(make_model("llama"), tokenizer, cfg, None, QUIET)
    assert "data-free calibration" in caplog.text


def test_perplexity_in_memory_equals_reloaded(tokenizer, tmp_path, ppl_text):
    qmodel = quantize_tiny(tokenizer, iters=4, nsamples=8)
    a = signround.perplexity(qmodel, tokenizer, str(ppl_text), seqlen=64, progress=False)
    signround.save(qmodel, tokenizer, tmp_path / "q")
    model, tok = signround.load_model(str(tmp_path / "q"))
    b = signround.perplexity(model, tok, str(ppl_text), seqlen=64, progress=False)
    assert a.windows == b.windows > 1 and a.ppl == b.ppl
    assert 1.0 < a.ppl < 10 * 320


def test_perplexity_matches_hf_loss(tokenizer, ppl_text):
    """Our windowed NLL equals the HF model's own shifted cross-entropy on each window."""
    from signround.eval.ppl import tokenize_windows, window_nll

    model = make_model("llama")
    windows = tokenize_windows(ppl_text.read_text(), tokenizer, 64)
    ours = window_nll(model, windows, progress=False)
    with torch.no_grad():
        ref = [model(input_ids=w[None], labels=w[None]).loss.double() * 63 for w in windows]
    assert torch.allclose(ours, torch.stack(ref), rtol=1e-5)


def test_bfloat16_model_quantizes_and_reloads(tokenizer, tmp_path):
    # Built the way a user's model is (from_pretrained in bfloat16), so its rotary buffers match a reload.
    make_model("llama").save_pretrained(tmp_path / "float")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16).eval()
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=32), iters=4, nsamples=8, seqlen=32)
    qmodel = signround.quantize(model, tokenizer, cfg, corpus(40, seed=1), QUIET)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        expected = qmodel(x).logits
    assert expected.dtype == torch.bfloat16
    signround.save(qmodel, tokenizer, tmp_path / "bf16")
    reloaded, _ = load_quantized(tmp_path / "bf16", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)


def test_compute_dtype_policy():
    from signround.devices import compute_dtype

    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("auto", "cuda:0") == torch.bfloat16
    assert compute_dtype("float16", None) == torch.float16


def test_rtn_needs_no_calibration_data(tokenizer, caplog):
    """RTN rounds weights alone (auto-round's iters=0): no data-free generation, same codes as tune_block."""
    from signround.model.blocks import find_blocks, resolve_schemes
    from signround.tune.signround import BlockData, tune_block

    caplog.set_level("INFO", logger="signround")
    scheme = signround.QuantScheme(bits=3, group_size=32)
    float_model = make_model("llama")
    _, blocks = find_blocks(float_model)
    schemes = resolve_schemes("model.layers.0", blocks[0], scheme)
    x = torch.randn(2, 8, 64)
    ref = tune_block(blocks[0], BlockData(x, x, {}), schemes, signround.TuneConfig(iters=0), seed=0)
    qmodel = signround.quantize(make_model("llama"), tokenizer, make_config(scheme=scheme, method="rtn"), None, QUIET)
    assert "data-free calibration" not in caplog.text and "no calibration data" in caplog.text
    for name, layer in ref.layers.items():
        q = qmodel.model.layers[0].get_submodule(name)
        assert torch.equal(q.codes(), layer.codes) and torch.equal(q.scales, layer.scale.half())


@pytest.mark.parametrize("native", [False, True])
def test_amp_warns_on_a_cpu_without_native_bfloat16(tokenizer, caplog, monkeypatch, native):
    """--amp is a slowdown where bfloat16 matmuls are emulated: the run says so, and still runs."""
    import signround.pipeline

    monkeypatch.setattr(signround.pipeline, "native_bf16_cpu", lambda: native)
    caplog.set_level("WARNING", logger="signround")
    qmodel = quantize_tiny(tokenizer, iters=2, nsamples=4, amp=True)
    assert qmodel is not None
    assert ("no native bfloat16" in caplog.text) is not native
