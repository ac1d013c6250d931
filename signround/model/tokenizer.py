"""Loading a model's tokenizer with a one-line error (shared by the whole-model and the block-streaming loaders)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from signround.errors import SignRoundError


def load_tokenizer(where: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in folder (or hub id) ``where``.

    Raises:
        SignRoundError: none can be loaded from there.
    """
    try:
        return AutoTokenizer.from_pretrained(where)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise SignRoundError(
            f"cannot load the tokenizer of {where} ({type(exc).__name__}); save one beside the model"
        ) from None
