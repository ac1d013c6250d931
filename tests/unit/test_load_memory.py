"""Peak memory of loading a large-vocabulary model, and the readers that keep it low.

A tied 65536 x 512 embedding (2 layers, 0.153 GB of float32 weights) is loaded in a fresh process and the rise of
its ``VmHWM`` over the value after imports is compared with the weights' bytes. Measured on this machine
(torch 2.13 CPU, transformers 5.24): ``load_model`` rose by 0.383 GB (2.50x the weights) when ``check_finite``
ran ``torch.isfinite(p).all()`` on whole parameters, and by 0.174 GB (1.14x) with the sliced check; the
weights themselves are the memory-mapped file, paged in once. ``read_safetensors`` rose by 1.01x the bytes it
returns, where ``safe_open(...).get_tensor`` plus a copy (the block reader's old way) rose by 2.03x. The bounds,
1.5x and 1.4x, leave room for allocator and page-cache noise and still fail on the old code. The quantize path's
skeleton (``load_skeleton``: blocks on the meta device, the rest read) leaves the embedding on the file
(``map_safetensors``): after a warm-up (modeling code imported, one tokenizer loaded) it rose by 0.35x the
embedding's bytes mapped, nearly all of it a second tokenizer and a read buffer, where reading the embedding
into owned memory adds 1x; the bound, 0.6x, fails on the old code. Without dropping the finiteness check's
cached pages, scattered lookups paged in 0.6x of the embedding (the kernel maps cached neighbours on a fault).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from signround.errors import SignRoundError
from signround.model import blocks, files
from signround.model.blocks import check_finite
from signround.model.files import map_safetensors, read_safetensors
from signround.model.lazy import load_skeleton

ROOT = Path(__file__).resolve().parents[2]
VOCAB, HIDDEN = 65536, 512


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer LLaMA with a tied 65536 x 512 embedding, saved as an HF safetensors folder."""
    folder = tmp_path_factory.mktemp("big-vocab")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(body: str, folder: Path, warm: str = "") -> dict:
    """Run ``body`` in a fresh process after the imports and ``warm``; it sets ``nbytes`` (the bytes it loaded).
    Returns ``{"rise": VmHWM rise over the value after imports, "nbytes": ...}`` in bytes."""
    code = f"""
import json, sys
import torch
import transformers.models.llama.modeling_llama  # imported before the baseline: not part of loading
from signround.model.files import read_safetensors
from signround.model.load import load_model
from signround.report import peak_rss_gb
folder = sys.argv[1]
{warm}
base = peak_rss_gb()
{body}
print(json.dumps({{"rise": (peak_rss_gb() - base) * 1e9, "nbytes": nbytes}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_load_model_peak_is_about_the_float_model(big_vocab):
    body = """
model, _ = load_model(folder)
assert next(model.parameters()).dtype == torch.float32
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
"""
    got = measure(body, big_vocab)
    assert got["nbytes"] > VOCAB * HIDDEN * 4
    assert got["rise"] < 1.5 * got["nbytes"], f"loading rose {got['rise'] / got['nbytes']:.2f}x the weights"


def test_read_safetensors_peak_is_one_copy(big_vocab):
    body = """
from pathlib import Path
from safetensors import safe_open
path = Path(folder) / "model.safetensors"
with safe_open(str(path), framework="pt") as f:
    names = list(f.keys())
tensors = read_safetensors(path, names, torch.float32)
nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
"""
    got = measure(body, big_vocab)
    assert got["rise"] < 1.4 * got["nbytes"], f"reading rose {got['rise'] / got['nbytes']:.2f}x the tensors"


def test_read_safetensors_matches_the_safetensors_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_READ_CHUNK", 1000)  # many slices per cast tensor
    torch.manual_seed(0)
    stored = {
        "f32": torch.randn(37, 11),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(300, 7).half(),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.randn(0, 3),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    save_file(stored, path, metadata={"format": "pt"})
    ref = load_file(path)
    for dtype in (torch.float32, torch.bfloat16):
        got = read_safetensors(path, list(stored), dtype)
        for name, t in ref.items():
            want = t.to(dtype) if t.is_floating_point() else t
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (name, dtype)


def test_read_safetensors_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorError):
        read_safetensors(path, ["w"], torch.float32)


def test_check_finite_finds_nan_past_the_first_slice(monkeypatch):
    monkeypatch.setattr(blocks, "_FINITE_CHUNK", 64)
    model = torch.nn.Sequential(torch.nn.Linear(8, 100))
    check_finite(model)
    with torch.no_grad():
        model[0].weight[97, 5] = float("inf")
    with pytest.raises(SignRoundError, match=r"weight blk\.0\.weight contains NaN or Inf"):
        check_finite(model, "blk.")
    transposed = torch.nn.Module()
    transposed.w = torch.nn.Parameter(model[0].weight.detach().t())  # a non-contiguous view
    with pytest.raises(SignRoundError, match="weight w contains NaN or Inf"):
        check_finite(transposed)


def test_skeleton_leaves_the_embedding_on_the_file(big_vocab):
    body = """
from signround.model.lazy import load_skeleton
model, _, stream = load_skeleton(folder, keep=True)
emb = model.model.embed_tokens.weight
assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # still tied
rows = emb[torch.arange(0, emb.shape[0], 97)].sum()  # a lookup touches only its rows' pages
nbytes = emb.numel() * emb.element_size()
"""
    # modeling code imported and a tokenizer loaded first: the skeleton's own rise is then a second tokenizer
    # (about 0.03 GB) and one read buffer of the finiteness check
    warm = """
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from signround.model.tokenizer import load_tokenizer
with init_empty_weights(include_buffers=False):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
load_tokenizer(folder)
"""
    got = measure(body, big_vocab, warm)
    assert got["nbytes"] == VOCAB * HIDDEN * 4
    assert got["rise"] < 0.6 * got["nbytes"], f"the skeleton rose {got['rise'] / got['nbytes']:.2f}x the embedding"


def test_skeleton_tensors_equal_the_files(big_vocab):
    model, _, stream = load_skeleton(big_vocab, keep=True)
    ref = load_file(big_vocab / "model.safetensors")
    state = model.state_dict()
    outside = [n for n in ref if not n.startswith(stream.prefix + ".")]
    assert outside and all(torch.equal(state[n], ref[n]) for n in outside)


def test_mapped_tensors_are_copy_on_write_and_match(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_READ_CHUNK", 1000)  # many slices per finiteness check
    torch.manual_seed(0)
    stored = {"f32": torch.randn(37, 11), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(7),
              "empty": torch.randn(0, 3), "scalar": torch.tensor(2.5)}  # fmt: skip
    path = tmp_path / "x.safetensors"
    save_file(stored, path)
    before = path.read_bytes()
    for dtype in (torch.float32, torch.bfloat16):
        got = map_safetensors(path, list(stored), dtype)
        for name, t in stored.items():
            want = t.to(dtype) if t.is_floating_point() else t
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (name, dtype)
    got = map_safetensors(path, ["f32"], torch.float32)
    got["f32"][3, 4] = 99.0  # a write copies its page: the file stays as it was
    assert path.read_bytes() == before
    assert torch.equal(map_safetensors(path, ["f32"], torch.float32)["f32"], stored["f32"])


def test_map_safetensors_refuses_nan_without_paging_it_in(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_READ_CHUNK", 256)
    w = torch.randn(64, 64)
    w[60, 3] = float("nan")  # past the first slices
    path = tmp_path / "x.safetensors"
    save_file({"w": w, "ok": torch.randn(4)}, path)
    with pytest.raises(SignRoundError, match=r"weight w contains NaN or Inf; the model file is corrupt"):
        map_safetensors(path, ["ok", "w"], torch.float32)  # mapped (same dtype)
    with pytest.raises(SignRoundError, match=r"weight w contains NaN or Inf"):
        map_safetensors(path, ["w"], torch.bfloat16)  # read and cast
    assert torch.equal(map_safetensors(path, ["ok"], torch.float32)["ok"], load_file(path)["ok"])


def test_streamed_run_refuses_a_nan_embedding_in_one_line(tmp_path, tokenizer):
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 7] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    done = subprocess.run(
        [sys.executable, "-m", "signround.cli", "quantize", "--model", str(tmp_path / "m"), "--method", "rtn",
         "--output", str(tmp_path / "out"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert "weight model.embed_tokens.weight contains NaN or Inf; the model file is corrupt" in done.stderr
    assert "Traceback" not in done.stderr
