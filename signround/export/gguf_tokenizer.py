"""Tokenizer metadata for GGUF files: a byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary.

A GGUF carries no ``tokenizer.json``; llama.cpp and transformers rebuild the tokenizer from these keys:

* ``tokenizer.ggml.model`` = ``"gpt2"`` (byte-level BPE) and ``tokenizer.ggml.pre``, the name of the
  pre-tokenizer (the regex that splits text before BPE): ``"smollm"`` for SmolLM's vocabulary or a
  digit-splitting byte-level tokenizer, ``"gpt-2"`` for a plain GPT-2 byte-level regex, ``"qwen2"`` /
  ``"llama-bpe"`` / ``"gpt-4o"`` for the split regex of Qwen2 and Qwen3, LLaMA 3, o200k (gpt-oss)
  (:data:`SPLIT_NAMES`), else ``"default"``. llama.cpp picks its regex from this name alone; transformers
  applies the named split for the last three and GPT-2's regex otherwise.
* ``tokenizer.ggml.tokens``: every token by id, in the vocabulary's byte-to-unicode spelling (``"Ġthe"``);
  added tokens are written as their text (``"<|im_end|>"``). Ids the tokenizer lacks, up to the model's
  vocabulary size, become ``[PAD<id>]`` (as llama.cpp's converter writes them).
* ``tokenizer.ggml.token_type``: 1 normal, 3 control (special added tokens), 4 user-defined (non-special
  added tokens), 5 unused (the padding ids).
* ``tokenizer.ggml.merges``: the BPE merges in rank order, each ``"left right"``.
* bos/eos/unknown/padding ids where the tokenizer sets them, ``add_bos_token`` / ``add_eos_token`` as the
  tokenizer actually behaves, and ``tokenizer.chat_template`` when it has one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from gguf import GGUFWriter, TokenType

from signround.errors import SignRoundError

log = logging.getLogger("signround")

# SmolLM (1 and 2) share one 49152-token vocabulary whose first added tokens are these, in this order.
_SMOLLM_VOCAB = 49152
_SMOLLM_HEAD = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>")
# The split regexes of tokenizer.json files that llama.cpp knows by name (``Split`` then a regex-free
# ``ByteLevel``): Qwen2 / Qwen3 (llama.cpp's llama-vocab.cpp quotes it), LLaMA 3, and o200k (gpt-oss).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe", _O200K_SPLIT: "gpt-4o"}


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SignRoundError(
            f"gguf export needs a fast (tokenizers-backed) tokenizer; {type(tokenizer).__name__} is not one"
        )
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer / decoder node flattened: a ``Sequence`` gives its members, ``None`` nothing."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get("pretokenizers", node.get("decoders", [])) for c in _components(child)]
    return [node]


def _is_byte_level(spec: dict[str, Any]) -> bool:
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    return any(p.get("type") == "ByteLevel" for p in parts)


def pre_tokenizer_name(spec: dict[str, Any], tokens: list[str]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this tokenizer (see the module docstring)."""
    if len(tokens) == _SMOLLM_VOCAB and tuple(tokens[: len(_SMOLLM_HEAD)]) == _SMOLLM_HEAD:
        return "smollm"
    parts = [p for p in _components(spec.get("pre_tokenizer")) if p.get("type") != "ByteLevel" or p.get("use_regex")]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # llama.cpp: digits one by one, then GPT-2's regex (same as its "starcoder")
    prefix = any(p.get("add_prefix_space") for p in _components(spec.get("pre_tokenizer")))
    if kinds == ["Split"] and not prefix and (name := SPLIT_NAMES.get((parts[0].get("pattern") or {}).get("Regex"))):
        return name  # Qwen2/2.5/3 (-MoE), LLaMA 3, gpt-oss: their ByteLevel step has no regex, no prefix space
    log.warning(
        "gguf: pre-tokenizer %s has no llama.cpp name; writing 'default', llama.cpp may split text differently",
        kinds,
    )
    return "default"


def _merges(spec: dict[str, Any]) -> list[str]:
    merges = spec["model"].get("merges", [])
    out = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise SignRoundError(f"tokenizer merge {m!r} cannot be written as GGUF's 'left right' string")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding puts ``token_id`` at the start (``first``) or end of every sequence."""
    if token_id is None:
        return False
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    n = len(bare)
    if len(full) <= n:
        return False
    if first:
        return full[0] == token_id and full[1 : n + 1] == bare
    return full[-1] == token_id and full[-n - 1 : -1] == bare


def add_tokenizer(writer: GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write ``tokenizer``'s metadata (module docstring) for a model with ``vocab_size`` embedding rows.

    Raises:
        SignRoundError: not a byte-level BPE tokenizer, or more tokens than the model has embeddings.
    """
    if tokenizer is None:
        raise SignRoundError("gguf export needs the model's tokenizer (llama.cpp reads the vocabulary from the file)")
    spec = _tokenizer_json(tokenizer)
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or not _is_byte_level(spec):
        what = "BPE without byte-level pre-tokenization" if kind == "BPE" else f"{kind}"
        raise SignRoundError(f"gguf export supports byte-level BPE tokenizers (GPT-2 style); this one is {what}")

    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SignRoundError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model has {vocab_size} embeddings"
        )
    added = {tok.content: (i, tok.special) for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        if token in added:
            types[i] = int(TokenType.CONTROL if added[token][1] else TokenType.USER_DEFINED)
        else:
            types[i] = int(TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec, tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec))
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in ids.items():
        if token_id is not None:
            setters[key](int(token_id))
    writer.add_add_bos_token(_adds(tokenizer, ids["bos"], first=True))
    writer.add_add_eos_token(_adds(tokenizer, ids["eos"], first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)
