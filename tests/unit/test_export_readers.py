"""signround reads back what auto-round, GPTQ and compressed-tensors layouts hold (its own exports here),
with the same logits as the model that was exported."""

from __future__ import annotations

import pytest
import torch

import signround
from signround import export
from signround.model.load import load_model
from signround.pack.packed import QuantLinear
from tests.conftest import quantize_tiny

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11]])


@pytest.mark.parametrize(("bits", "sym"), [(4, False), (3, True), (8, False)])
def test_every_export_loads_back_with_identical_logits(tmp_path, tokenizer, bits, sym):
    q = quantize_tiny(
        tokenizer,
        scheme=signround.QuantScheme(bits=bits, group_size=32, sym=sym),
        layer_config={r"layers\.0\.mlp\.down_proj": {"bits": 2}, r"layers\.1\.self_attn\.o_proj": None},
    )
    for layer in q.modules():  # GPTQ v1 cannot hold a zero point of 0
        if isinstance(layer, QuantLinear) and not layer.scheme.sym:
            layer.qzeros.clamp_(min=1)
    with torch.no_grad():
        ref = q(IDS).logits
    fmts = ["auto_round", "gptq", "compressed-tensors"]
    export.save(q, tokenizer, tmp_path / "out", fmts)
    for fmt in fmts:
        model, _ = load_model(str(tmp_path / "out" / fmt))
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
        assert model.model.layers[0].mlp.down_proj.scheme.bits == 2
        assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref), fmt


def test_a_gguf_folder_loads_as_a_model(tmp_path, tokenizer):
    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=8, group_size=32, sym=True))
    export.save(q, tokenizer, tmp_path / "g", "gguf:q8_0")
    model, tok = load_model(str(tmp_path / "g"))
    with torch.no_grad():
        ref = q(IDS).logits
        assert torch.allclose(model(IDS).logits, ref, atol=2e-3 * ref.abs().max().item())
    assert tok("the quick brown fox").input_ids == tokenizer("the quick brown fox").input_ids
