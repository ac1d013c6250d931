"""Calibration texts -> a seeded ``[nsamples, seqlen]`` token tensor.

Sources: a named data set (``c4``, ``pile-10k``, ``wikitext2``: a data folder's file, else the hub; see
:mod:`signround.calib.sources`); a local ``.txt`` (documents separated by blank lines), ``.jsonl`` (field
``text``), ``.json`` (a list of strings or of objects with ``text``), ``.parquet`` (column ``text``); any other
HF dataset id when online (needs the ``datasets`` package); or nothing, in which case the model generates its
own calibration text (data-free calibration).

Sampling (deterministic for a seed): documents are shuffled; each document of at least ``seqlen`` tokens
gives one sample, its first ``seqlen`` tokens (auto-round's rule, so both tools see the same samples);
if that gives fewer than ``nsamples``, the remaining tokens of all documents are joined with EOS and cut
into non-overlapping windows.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from signround.calib.sources import CALIB, HubSource, load_hub, local_file, put_file_hint
from signround.config import CalibConfig
from signround.errors import SignRoundError

log = logging.getLogger("signround")


def load_texts(dataset: str, data_dir: str | Path | None = None) -> list[str]:
    """Read calibration documents: a named data set (:data:`signround.calib.sources.CALIB`, looked for in
    ``data_dir`` / ``$SIGNROUND_DATA``, ``../shared/data``, then the hub), a file path, or an HF dataset id."""
    if dataset in CALIB:
        found = local_file(dataset, CALIB, data_dir)
        if found is not None:
            log.info("calibration data %s: %s", dataset, found)
            return _read_file(found)
        log.info("calibration data %s: %s from the hub", dataset, CALIB[dataset].hub.describe())
        return load_hub(CALIB[dataset].hub, f"calibration data {dataset}", put_file_hint(CALIB[dataset].file, data_dir))
    path = Path(dataset).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.suffix in {".txt", ".jsonl", ".json", ".parquet"} or dataset.startswith((".", "/")):
        raise SignRoundError(f"calibration file {dataset} not found (named data sets: {', '.join(CALIB)})")
    return _read_hub(dataset)


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise SignRoundError(f"{path}:{lineno}: each JSON line needs a string field 'text'")
                texts.append(row["text"])
            return texts
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                return [d if isinstance(d, str) else str(d.get("text", "")) for d in data]
            raise SignRoundError(f"{path}: expected a JSON list of strings or of objects with 'text'")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise SignRoundError(f"{path}: no 'text' column (columns: {table.column_names})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        text = path.read_text(encoding="utf-8")
    except json.JSONDecodeError as exc:
        raise SignRoundError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except UnicodeDecodeError:
        raise SignRoundError(f"{path} is not UTF-8 text; give a .txt, .jsonl, .json or .parquet file") from None
    except OSError as exc:
        raise SignRoundError(f"cannot read calibration data {path}: {exc.strerror or exc}") from None
    return [doc for doc in text.split("\n\n") if doc.strip()]


def _read_hub(name: str) -> list[str]:
    """An HF dataset id (``repo`` or ``repo:subset``): its train split's ``text`` column."""
    repo, _, subset = name.partition(":")
    return load_hub(HubSource(repo, "train", name=subset or None), f"HF dataset {name!r}", "give a local file")


def sample_tokens(texts: list[str], tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """Tokenize ``texts`` and draw ``[n, cfg.seqlen]`` int64 samples (``n <= cfg.nsamples``).

    Raises:
        SignRoundError: the texts hold fewer than ``seqlen`` tokens in all.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise SignRoundError("calibration data is empty; give a file with text in it")
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    ids = tokenizer([texts[i] for i in order], add_special_tokens=True)["input_ids"]
    seqlen = cfg.seqlen
    samples: list[list[int]] = []
    rest: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in ids:
        if len(doc) >= seqlen and len(samples) < cfg.nsamples:
            samples.append(doc[:seqlen])
            doc = doc[seqlen:]
        if doc:
            rest.extend(doc)
            if eos is not None:
                rest.append(eos)
    for start in range(0, len(rest) - seqlen + 1, seqlen):
        if len(samples) >= cfg.nsamples:
            break
        samples.append(rest[start : start + seqlen])
    if not samples:
        total = sum(len(d) for d in ids)
        raise SignRoundError(
            f"calibration data has only {total} tokens, fewer than seqlen={seqlen}; "
            "give more text or a smaller --seqlen"
        )
    if len(samples) < cfg.nsamples:
        log.warning(
            "calibration data gives only %d samples of %d tokens (asked for %d)", len(samples), seqlen, cfg.nsamples
        )
    return torch.tensor(samples, dtype=torch.long)


@torch.no_grad()
def generate_tokens(model, tokenizer, cfg: CalibConfig, batch_size: int = 16) -> torch.Tensor:
    """Data-free calibration: sample ``[nsamples, seqlen]`` tokens from the model itself, starting from
    BOS (or EOS), with top-k 50 sampling seeded by ``cfg.seed``."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SignRoundError("data-free calibration needs a tokenizer with a BOS or EOS token; give --dataset")
    log.info(
        "no calibration data given: generating %d x %d tokens from the model itself (data-free calibration)",
        cfg.nsamples,
        cfg.seqlen,
    )
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    out = []
    for i in range(0, cfg.nsamples, batch_size):
        n = min(batch_size, cfg.nsamples - i)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        seqs = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=50,
            max_new_tokens=cfg.seqlen - 1,
            min_new_tokens=cfg.seqlen - 1,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(seqs[:, : cfg.seqlen].cpu())
    return torch.cat(out)


def calibration_tokens(model, tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """The run's calibration tokens ``[n, seqlen]``: from ``cfg.dataset``, or generated when it is None."""
    if cfg.dataset is None:
        return generate_tokens(model, tokenizer, cfg)
    return sample_tokens(load_texts(cfg.dataset, cfg.data_dir), tokenizer, cfg)


def resolve_tokens(model: Any, tokenizer: Any, calib: CalibConfig, data: Any = None) -> torch.Tensor:
    """Calibration tokens ``[n, seqlen]`` int64 from ``data``: a ``[n, seqlen]`` tensor (cut to
    ``calib.nsamples`` x ``calib.seqlen``), a list of texts (sampled by :func:`sample_tokens`), or None
    (``calib.dataset``, or text the model generates: :func:`calibration_tokens`)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise SignRoundError("calibration token tensor must be int64 [nsamples, seqlen]")
        return data[: calib.nsamples, : calib.seqlen]
    if isinstance(data, Sequence) and not isinstance(data, str):
        return sample_tokens(list(data), tokenizer, calib)
    return calibration_tokens(model, tokenizer, calib)
