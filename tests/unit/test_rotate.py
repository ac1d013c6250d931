"""Rotations folded into the weights: the Hadamard construction is orthogonal and seeded, the rotated float
model computes the same logits (tied embeddings and biases included) and saves and reloads as an ordinary
model, outlier channels are spread, and what is not handled is refused in one line. ``--rotate online``: the
run-time Hadamard equals the dense matrix, the rotated float model still computes the same logits, a W4A4 run
has less error than the folded rotation where the MLP's hidden state has an outlier, the native checkpoint
reloads with the rotation applied (Double Rounding keeps it), and the formats whose readers cannot apply it
refuse it before tuning and at save time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from signround.act.hadamard import OnlineHadamard, online_layers
from signround.config import Rotation
from signround.errors import SignRoundError
from signround.model.rotate import random_hadamard, rotate_model, sylvester
from tests.conftest import make_model

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _random_norms(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)


@pytest.mark.parametrize("width", [1, 2, 64, 96, 576])
def test_randomized_hadamard_is_orthogonal_and_seeded(width):
    q = random_hadamard(width, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_hadamard(width, seed=3))
    if width >= 64:
        assert not torch.equal(q, random_hadamard(width, seed=4))
        assert q.abs().max() < 0.5  # every output mixes many inputs: no near-identity columns
    h = sylvester(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_rotated_model_computes_the_same_logits(tmp_path, family):
    model = make_model(family)
    _random_norms(model)
    if family == "qwen2":  # biases on q/k/v: v's is rotated with its rows
        assert model.model.layers[0].self_attn.v_proj.bias is not None
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.data.normal_(0, 0.1)
    ref = _logits(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    record = rotate_model(model, seed=7)
    assert record["seed"] == 7 and record["online"] == []
    got = _logits(model)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "rotated")  # an ordinary model: saved and loaded as one
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated").eval()
    assert torch.allclose(_logits(loaded), got, atol=1e-6 * got.abs().max().item(), rtol=0)


def test_rotation_spreads_an_outlier_channel():
    model = make_model("llama")
    model.model.embed_tokens.weight.data[:, 5] *= 40  # one massive residual channel
    seen = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))

    def peak_to_rms() -> float:
        _logits(model)
        x = seen["x"].reshape(-1, seen["x"].shape[-1])
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    before = peak_to_rms()
    rotate_model(model, seed=0)
    after = peak_to_rms()
    hook.remove()
    assert before > 5 and after < before / 2, (before, after)


def test_what_is_not_rotatable_is_refused_in_one_line():
    with pytest.raises(SignRoundError, match="supports LLaMA-style decoders.*this model is opt") as err:
        rotate_model(make_model("opt"))
    assert "\n" not in str(err.value)


def test_rotate_in_a_run_lowers_4bit_activation_error_and_saves_an_ordinary_checkpoint(tmp_path, tokenizer):
    import signround
    from signround.config import ActScheme, QuantScheme
    from tests.conftest import quantize_tiny

    def outlier_model():
        model = make_model("llama")
        model.model.embed_tokens.weight.data[:, 5] *= 40
        return model

    ref = _logits(outlier_model())
    errors = {}
    for rotate in (False, True):
        q = quantize_tiny(tokenizer, model=outlier_model(), scheme=QuantScheme(bits=8, group_size=32, sym=True),
                          act=ActScheme(bits=4), iters=0, rotate=rotate)  # fmt: skip
        errors[rotate] = float((_logits(q) - ref).pow(2).mean())
    assert errors[True] < 0.75 * errors[False], errors  # 0.63x when written; down_proj inputs are not rotated
    assert q.config.quantization_config["rotation"]["seed"] == 42
    signround.save(q, tokenizer, tmp_path / "rotated")
    loaded, _ = signround.load_model(str(tmp_path / "rotated"))
    assert torch.equal(_logits(loaded), _logits(q))


@pytest.mark.parametrize("width", [64, 192, 1536])
def test_online_hadamard_is_the_dense_rotation(width):
    x = torch.randn(2, 5, width, dtype=torch.float64)
    op = OnlineHadamard(width, seed=11)
    dense = (x @ random_hadamard(width, seed=11)).float()
    assert torch.allclose(op.apply(x.float()), dense, atol=1e-5)
    assert op.apply(x.bfloat16()).dtype == torch.bfloat16


def _mlp_outlier_model():
    """A tiny LLaMA whose MLP hidden state (down_proj's input) has one massive channel, whose down_proj column
    is as much smaller (the same function: an activation outlier, as in real models)."""
    model = make_model("llama")
    for block in model.model.layers:
        block.mlp.up_proj.weight.data[3] *= 100
        block.mlp.down_proj.weight.data[:, 3] /= 100
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_online_rotation_keeps_the_logits_and_hooks_every_down_proj(family):
    model = make_model(family)
    _random_norms(model)
    ref = _logits(model)
    record = rotate_model(model, seed=5, mode=Rotation.ONLINE)
    down = model.model.layers[0].mlp.down_proj
    assert record["mode"] == "online"
    assert record["online"] == [{"module": "mlp.down_proj", "kind": "randomized-hadamard",
                                 "width": down.in_features, "seed": 7}]  # fmt: skip
    assert online_layers(model) == [f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))]
    got = _logits(model)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_online_rotation_in_a_run_lowers_w4a4_error_and_reloads_natively(tmp_path, tokenizer):
    import signround
    from signround.config import ActScheme, QuantScheme
    from signround.pack.derive import serve_at_bits
    from tests.conftest import quantize_tiny

    ref = _logits(_mlp_outlier_model())
    errors, models = {}, {}
    for mode in (Rotation.FOLDED, Rotation.ONLINE):
        q = quantize_tiny(tokenizer, model=_mlp_outlier_model(), scheme=QuantScheme(bits=8, group_size=32, sym=True),
                          act=ActScheme(bits=4), iters=0, rotate=mode)  # fmt: skip
        errors[mode], models[mode] = float((_logits(q) - ref).pow(2).mean()), q
    assert errors[Rotation.ONLINE] < 0.8 * errors[Rotation.FOLDED], errors  # 0.65x when written
    q = models[Rotation.ONLINE]
    assert q.config.quantization_config["rotation"]["online"][0]["module"] == "mlp.down_proj"
    assert online_layers(q)  # carried onto the quantized layers
    signround.save(q, tokenizer, tmp_path / "native")
    loaded, _ = signround.load_model(str(tmp_path / "native"))
    assert torch.equal(_logits(loaded), _logits(q))
    served = serve_at_bits(loaded, 4)
    assert len(online_layers(served)) == len(served.model.layers)
    with pytest.raises(SignRoundError, match="rotates the input of 2 layers at run time.*--format native") as err:
        signround.save(q, tokenizer, tmp_path / "gptq", formats="gptq")
    assert "\n" not in str(err.value) and not (tmp_path / "gptq").exists()


def test_online_rotation_is_refused_for_formats_that_cannot_apply_it():
    from signround.config import ExportConfig, QuantConfig

    with pytest.raises(SignRoundError, match="--rotate online .* auto_round readers do not apply"):
        QuantConfig(rotate="online", export=ExportConfig(formats="native,auto_round"))
    assert QuantConfig(rotate=True).rotate is Rotation.FOLDED and not QuantConfig().rotate
    with pytest.raises(SignRoundError, match="unknown rotation 'spin'"):
        QuantConfig(rotate="spin")


def test_a_folded_rotation_exports_to_compressed_tensors_and_transformers_reads_the_same_logits(tmp_path, tokenizer):
    import signround
    from signround.config import ActScheme, QuantScheme
    from tests.conftest import quantize_tiny

    q = quantize_tiny(tokenizer, model=make_model("llama"), scheme=QuantScheme(dtype="fp8_e4m3", group_size=-1),
                      act=ActScheme(bits=8, dtype="fp8_e4m3"), iters=0, rotate=Rotation.FOLDED)  # fmt: skip
    assert q.config.quantization_config["rotation"]["mode"] == "folded" and not online_layers(q)
    signround.save(q, tokenizer, tmp_path / "ct", formats="compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()  # the third-party reader
    ref = _logits(q)
    assert torch.allclose(_logits(loaded), ref, atol=1e-5, rtol=0)
