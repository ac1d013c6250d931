"""Perplexity in the standard protocol.

Tokenize the whole text once, cut it into non-overlapping windows of ``seqlen`` tokens (the remainder
is dropped), score every window independently, and report ``exp(mean token NLL)`` over all predicted
tokens (``seqlen - 1`` per window: the first token of a window has no context).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from signround.calib.sources import EVAL, eval_text
from signround.errors import SignRoundError
from signround.pack.packed import dequantized_weights


def resolve_text(spec: str, data_dir: str | Path | None = None) -> Path:
    """A perplexity text: a named data set (``wikitext2``, ``c4``, ``ptb``: a data folder's file, else joined
    from the hub once; :mod:`signround.calib.sources`) or a path to a text file."""
    if spec in EVAL:
        return eval_text(spec, data_dir)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SignRoundError(f"perplexity text {spec!r} not found; give {', '.join(EVAL)} or a path to a text file")
    return path


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "windows": self.windows, "seqlen": self.seqlen, "tokens": self.tokens}


def tokenize_windows(text: str, tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[windows, seqlen]`` int64: the tokenized text cut into non-overlapping windows."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise SignRoundError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a smaller --seqlen"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> torch.Tensor:
    """Summed NLL per window ``[windows]`` float64 (over ``seqlen - 1`` predicted tokens each)."""
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="window", disable=not progress, file=sys.stderr)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        out.append(nll.double().sum(dim=1).cpu())
        bar.update(batch.shape[0])
    bar.close()
    return torch.cat(out)


def perplexity(
    model,
    tokenizer,
    text: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    data_dir: str | Path | None = None,
) -> PplResult:
    """Perplexity of ``model`` on ``text`` (a name such as ``wikitext2``, found as :func:`resolve_text` says,
    looking in ``data_dir`` first, or a file path)."""
    if seqlen < 2:
        raise SignRoundError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise SignRoundError(f"--max-windows must be >= 1, got {max_windows}")
    path = resolve_text(text, data_dir)
    windows = tokenize_windows(path.read_text(encoding="utf-8"), tokenizer, seqlen, max_windows)
    was_training = model.training
    model.eval()
    with dequantized_weights(model):
        nll = window_nll(model, windows, batch_size, progress)
    model.train(was_training)
    tokens = windows.shape[0] * (seqlen - 1)
    mean = float(nll.sum() / tokens)
    if not math.isfinite(mean):
        raise SignRoundError("perplexity is not finite: the model produced NaN/Inf logits")
    return PplResult(ppl=math.exp(mean), nll=mean, windows=windows.shape[0], seqlen=seqlen, tokens=tokens)
