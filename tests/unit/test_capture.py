"""Each decoder block gets its own call kwargs: a model with sliding-window and full-attention layers passes
each block the mask (and Gemma-3 the rotary embeddings) of its type, and the blocks chained on the captured
kwargs reproduce the model's hidden states exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from signround.calib.capture import block_output, capture_block_inputs, capture_block_kwargs
from signround.model.blocks import find_blocks

SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
CONFIGS = {
    "gemma3_text": {"layer_types": SLIDING, "sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": SLIDING},
    "llama": {},
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_blocks_chained_on_their_own_kwargs_reproduce_the_model(family):
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
                               **CONFIGS[family])  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    _, blocks = find_blocks(model)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    x, _ = capture_block_inputs(model, blocks[0], tokens)
    kwargs = capture_block_kwargs(model, blocks, tokens[0])
    assert len(kwargs) == 3
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states
        for i, block in enumerate(blocks[:-1]):  # the last hidden state is after the final norm
            x = block_output(block(x, **kwargs[i]))
            assert torch.equal(x, expected[i + 1]), f"block {i}"
    assert all("forward" not in vars(b) for b in blocks)  # the pass-throughs are gone


def test_layers_of_another_attention_type_get_another_mask():
    cfg = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
                               **CONFIGS["gemma3_text"])  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _, blocks = find_blocks(model)
    kwargs = capture_block_kwargs(model, blocks, torch.randint(0, 300, (24,)))
    assert not torch.equal(kwargs[0]["attention_mask"], kwargs[1]["attention_mask"])
    assert torch.equal(kwargs[0]["attention_mask"], kwargs[2]["attention_mask"])
