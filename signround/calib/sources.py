"""Named data sets (``--dataset c4``, ``--ppl wikitext2``) and where they are found.

A name resolves, in order, to:

1. its file in the data folder given by ``--data-dir`` (or ``$SIGNROUND_DATA`` when no folder is given);
2. its file in ``../shared/data`` next to the project (this project's machines, offline);
3. the hub, through the ``datasets`` library (cached by it; perplexity texts are also joined once into
   ``$SIGNROUND_CACHE/data/``, default ``~/.cache/signround/data/``), with the split and joining the field's
   protocol uses;

and otherwise to a one-line error that names the file to put in a data folder, or the package and network the
hub needs. Anything that is not a name is a path.

Calibration names (:data:`CALIB`): ``c4`` (local ``calib-c4.jsonl``; hub ``allenai/c4``, the first English
training shard, as auto-round), ``pile-10k`` (``pile-10k.jsonl``; ``NeelNanda/pile-10k``, auto-round's
default), ``wikitext2`` (``wikitext2-train.raw``; wikitext-2-raw-v1 train). Perplexity names (:data:`EVAL`):
``wikitext2`` (``wikitext2-test.raw``; wikitext-2-raw-v1 test, lines joined with ``"\\n\\n"`` as GPTQ and
auto-round), ``c4`` (``c4-validation.txt``; the first validation shard's first 1100 documents joined with
``" "``, GPTQ's ``c4-new``), ``ptb`` (``ptb-test.txt``; ``ptb_text_only`` test sentences joined with ``" "``,
GPTQ's ``ptb-new``). A local file and the hub copy of one name are not the same sample (``calib-c4.jsonl`` is
1000 C4 documents of unstated shard), so a run's report records the path it used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from signround.errors import SignRoundError
from signround.paths import cache_dir

SHARED_DATA_ENV = "SIGNROUND_DATA"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(frozen=True)
class HubSource:
    """A data set on the hub: ``datasets.load_dataset(path, name, data_files=..., split=split)[field]``; for a
    perplexity text, its first ``docs`` rows (all when None) joined with ``join``."""

    path: str
    split: str
    field: str = "text"
    name: str | None = None
    data_files: str | None = None
    join: str = "\n\n"
    docs: int | None = None

    def describe(self) -> str:
        what = self.path + (f" ({self.name})" if self.name else "") + (f" {self.data_files}" if self.data_files else "")
        return f"{what}, split {self.split}"


@dataclass(frozen=True)
class NamedData:
    """A named data set: the file looked for in each data folder, and its hub source."""

    file: str
    hub: HubSource


CALIB: dict[str, NamedData] = {
    "c4": NamedData(
        "calib-c4.jsonl", HubSource("allenai/c4", "train", data_files="en/c4-train.00000-of-01024.json.gz")
    ),
    "pile-10k": NamedData("pile-10k.jsonl", HubSource("NeelNanda/pile-10k", "train")),
    "wikitext2": NamedData("wikitext2-train.raw", HubSource("wikitext", "train", name="wikitext-2-raw-v1")),
}
EVAL: dict[str, NamedData] = {
    "wikitext2": NamedData("wikitext2-test.raw", HubSource("wikitext", "test", name="wikitext-2-raw-v1")),
    "c4": NamedData(
        "c4-validation.txt",
        HubSource(
            "allenai/c4", "validation", data_files="en/c4-validation.00000-of-00008.json.gz", join=" ", docs=1100
        ),
    ),
    "ptb": NamedData(
        "ptb-test.txt", HubSource("ptb_text_only", "test", field="sentence", name="penn_treebank", join=" ")
    ),
}


def data_dirs(explicit: str | Path | None = None) -> list[Path]:
    """The local data folders in lookup order: ``explicit`` (``--data-dir``) or else ``$SIGNROUND_DATA``,
    then ``../shared/data``."""
    first = explicit or os.environ.get(SHARED_DATA_ENV)
    dirs = [Path(first).expanduser()] if first else []
    return dirs + ([SHARED] if SHARED not in dirs else [])


def data_dir(explicit: str | Path | None = None) -> Path:
    """The first data folder (:func:`data_dirs`): where task files and named files are looked for first."""
    return data_dirs(explicit)[0]


def local_file(name: str, table: dict[str, NamedData], explicit: str | Path | None = None) -> Path | None:
    """The first data folder's copy of the named data set's file, or None."""
    for folder in data_dirs(explicit):
        path = folder / table[name].file
        if path.is_file():
            return path
    return None


def put_file_hint(file: str, explicit: str | Path | None = None) -> str:
    """What to do when a named data set is nowhere: put its file in one of the data folders."""
    where = " or ".join(str(d) for d in data_dirs(explicit))
    return f"put {file} in {where} (or pass --data-dir)"


def load_hub(source: HubSource, what: str, fix: str) -> list[str]:
    """The rows' ``field`` values of a hub data set; a one-line error ending in ``fix`` when ``datasets`` is
    missing or the hub cannot be reached."""
    try:
        import datasets
    except ImportError:
        raise SignRoundError(f"{what}: 'datasets' is not installed; {fix}") from None
    kwargs = {"data_files": {source.split: source.data_files}} if source.data_files else {}
    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "datasets")]  # their retries print warnings
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        ds = datasets.load_dataset(source.path, source.name, split=source.split, **kwargs)
    except Exception as exc:  # datasets raises many unrelated types for "not reachable"
        raise SignRoundError(
            f"{what}: cannot load {source.describe()} from the hub ({type(exc).__name__}; offline?); {fix}"
        ) from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    if source.field not in ds.column_names:
        raise SignRoundError(f"{what}: {source.describe()} has no {source.field!r} column")
    rows = ds[source.field] if source.docs is None else ds[: source.docs][source.field]
    return [t for t in rows if isinstance(t, str)]


def eval_text(name: str, explicit: str | Path | None = None) -> Path:
    """The text file of the perplexity data set ``name`` (:data:`EVAL`), local or joined from the hub once."""
    found = local_file(name, EVAL, explicit)
    if found is not None:
        return found
    entry = EVAL[name]
    cached = cache_dir() / "data" / entry.file
    if cached.is_file():
        return cached
    text = entry.hub.join.join(load_hub(entry.hub, f"{name} test text", put_file_hint(entry.file, explicit)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cached.parent, delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, cached)  # atomic: a stopped run leaves no half-written text
    return cached
