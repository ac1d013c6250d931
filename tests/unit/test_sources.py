"""Named data sets: the lookup order (--data-dir / $SIGNROUND_DATA, ../shared/data, the hub), the hub call's
standard splits and joining, the cache of joined texts, and the one-line errors when nothing is found."""

from __future__ import annotations

import json
import sys
import types

import pytest

from signround.calib import sources
from signround.calib.data import load_texts
from signround.errors import SignRoundError
from signround.eval.harness import tasks_dir
from signround.eval.ppl import resolve_text


def _folder(root, name):
    root.mkdir(parents=True, exist_ok=True)
    (root / "calib-c4.jsonl").write_text(json.dumps({"text": f"{name} document"}) + "\n")
    (root / "wikitext2-test.raw").write_text(f"{name} wiki text\n")
    return root


class FakeHub:
    """Stands in for the ``datasets`` package: records each ``load_dataset`` call, serves fixed rows."""

    def __init__(self, rows=None, fail: Exception | None = None):
        self.calls, self.rows, self.fail = [], rows or {}, fail

    def load_dataset(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split, kwargs))
        if self.fail is not None:
            raise self.fail
        field, values = next(iter(self.rows.items()))

        class Rows:
            column_names = [field]

            def __getitem__(self, key):
                return values if key == field else {field: values[key]}

        return Rows()


@pytest.fixture
def hub(monkeypatch):
    def install(fake):
        module = types.ModuleType("datasets")
        module.load_dataset = fake.load_dataset
        monkeypatch.setitem(sys.modules, "datasets", module)
        return fake

    return install


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """An isolated ../shared/data (empty unless a test fills it), no $SIGNROUND_DATA, a private cache."""
    folder = tmp_path / "shared"
    folder.mkdir()
    monkeypatch.setattr(sources, "SHARED", folder)
    monkeypatch.delenv(sources.SHARED_DATA_ENV, raising=False)
    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path / "cache"))
    return folder


def test_named_data_is_found_in_order(tmp_path, monkeypatch, shared, hub):
    fake = hub(FakeHub(fail=AssertionError("the hub is the last resort")))
    explicit, env = _folder(tmp_path / "explicit", "explicit"), _folder(tmp_path / "env", "env")
    _folder(shared, "shared")
    monkeypatch.setenv(sources.SHARED_DATA_ENV, str(env))
    assert load_texts("c4", explicit) == ["explicit document"]
    assert resolve_text("wikitext2", explicit) == explicit / "wikitext2-test.raw"
    assert load_texts("c4") == ["env document"]
    (env / "calib-c4.jsonl").unlink()  # a folder without the file: the next one is looked in
    assert load_texts("c4") == ["shared document"]
    monkeypatch.delenv(sources.SHARED_DATA_ENV)
    assert resolve_text("wikitext2") == shared / "wikitext2-test.raw"
    assert fake.calls == []


def test_the_hub_gets_the_standard_split_and_the_text_is_joined_once(shared, hub):
    fake = hub(FakeHub({"text": ["first", "", "second"]}))
    assert load_texts("c4") == ["first", "", "second"]
    assert fake.calls[-1] == (
        "allenai/c4",
        None,
        "train",
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
    )
    path = resolve_text("wikitext2")
    assert fake.calls[-1] == ("wikitext", "wikitext-2-raw-v1", "test", {})
    assert path.read_text() == "first\n\n\n\nsecond"  # GPTQ's and auto-round's "\n\n".join of the test split
    assert resolve_text("wikitext2") == path and len(fake.calls) == 2  # cached: the hub is not asked again
    fake.rows = {"sentence": ["a b", "c"]}
    assert resolve_text("ptb").read_text() == "a b c"
    assert fake.calls[-1] == ("ptb_text_only", "penn_treebank", "test", {})


def test_nothing_found_is_one_line_that_says_what_to_put_where(tmp_path, monkeypatch, shared, hub):
    hub(FakeHub(fail=ConnectionError("no network")))
    with pytest.raises(SignRoundError) as err:
        load_texts("pile-10k", tmp_path / "mine")
    message = str(err.value)
    assert "\n" not in message and "ConnectionError; offline?" in message
    assert f"put pile-10k.jsonl in {tmp_path / 'mine'} or {shared}" in message
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: importing it fails
    with pytest.raises(SignRoundError, match="'datasets' is not installed; put c4-validation.txt in"):
        resolve_text("c4")
    with pytest.raises(SignRoundError, match="give wikitext2, c4, ptb or a path"):
        resolve_text("wikitext3")
    with pytest.raises(SignRoundError, match=r"not found \(named data sets: c4, pile-10k, wikitext2\)"):
        load_texts("./c5.jsonl")


def test_cli_finds_named_data_in_data_dir(tmp_path, monkeypatch, shared, model_dir, capsys):
    from signround.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "wikitext2-test.raw").write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    assert main(["eval", "--model", str(model_dir), "--ppl", "wikitext2", "--data-dir", str(folder),
                 "--seqlen", "64", "--max-windows", "2", "--quiet"]) == 0  # fmt: skip
    assert "perplexity (wikitext2, 2 windows x 64 tokens)" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["eval", "--model", str(model_dir), "--ppl", "c4", "--data-dir", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "put c4-validation.txt in" in err[0]


def test_tasks_dir_takes_the_data_folder_or_the_tasks_folder(tmp_path, shared):
    (tmp_path / "data" / "tasks").mkdir(parents=True)
    assert tasks_dir(tmp_path / "data") == tmp_path / "data" / "tasks"
    assert tasks_dir(tmp_path / "data" / "tasks") == tmp_path / "data" / "tasks"
    assert tasks_dir() == shared / "tasks"
