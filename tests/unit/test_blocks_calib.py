import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from signround.calib.data import load_texts, sample_tokens
from signround.config import CalibConfig, LayerRule, QuantScheme
from signround.errors import SignRoundError
from signround.model.blocks import block_linears, find_blocks, resolve_schemes
from tests.conftest import corpus, make_model


@pytest.mark.parametrize(
    "family,prefix,n_linear",
    [("llama", "model.layers", 7), ("qwen2", "model.layers", 7), ("opt", "model.decoder.layers", 6)],
)
def test_find_blocks_on_three_families(family, prefix, n_linear):
    model = make_model(family, layers=3)
    name, blocks = find_blocks(model)
    assert name == prefix and len(blocks) == 3
    assert len(block_linears(blocks[0])) == n_linear


def test_architecture_without_linear_blocks_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))  # Conv1D, not nn.Linear
    with pytest.raises(SignRoundError, match="unsupported architecture"):
        find_blocks(gpt2)


def test_layer_rules_override_and_skip():
    model = make_model("llama")
    _, blocks = find_blocks(model)
    base = QuantScheme(bits=4, group_size=32)
    rules = (LayerRule(r"mlp\.", base.replace(bits=8)), LayerRule(r"layers\.0\.mlp\.down_proj", None))
    s0 = resolve_schemes("model.layers.0", blocks[0], base, rules)
    s1 = resolve_schemes("model.layers.1", blocks[1], base, rules)
    assert "mlp.down_proj" not in s0 and s1["mlp.down_proj"].bits == 8
    assert s0["mlp.up_proj"].bits == 8 and s0["self_attn.q_proj"] == base


def test_group_larger_than_width_is_refused():
    model = make_model("llama")
    _, blocks = find_blocks(model)
    with pytest.raises(SignRoundError, match="exceeds in_features 64"):
        resolve_schemes("model.layers.0", blocks[0], QuantScheme(group_size=128))


def test_file_formats(tmp_path):
    docs = corpus(5)
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "a.json").write_text(json.dumps(docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    for ext in ("txt", "jsonl", "json", "parquet"):
        assert load_texts(str(tmp_path / f"a.{ext}")) == docs


def test_bad_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(SignRoundError, match="field 'text'"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(SignRoundError, match="not found"):
        load_texts(str(tmp_path / "missing.jsonl"))


def test_sampling_is_deterministic_and_seeded(tokenizer):
    docs = corpus(60, seed=1)
    a = sample_tokens(docs, tokenizer, CalibConfig(nsamples=8, seqlen=32, seed=1))
    b = sample_tokens(docs, tokenizer, CalibConfig(nsamples=8, seqlen=32, seed=1))
    c = sample_tokens(docs, tokenizer, CalibConfig(nsamples=8, seqlen=32, seed=2))
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_short_and_empty_data_are_refused(tokenizer):
    with pytest.raises(SignRoundError, match="fewer than seqlen"):
        sample_tokens(["a few words"], tokenizer, CalibConfig(nsamples=4, seqlen=64))
    with pytest.raises(SignRoundError, match="empty"):
        sample_tokens(["", "  "], tokenizer, CalibConfig(nsamples=4, seqlen=64))
