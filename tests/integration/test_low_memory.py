"""--low-memory: the model is built on the meta device and one block at a time is read from the shards;
the result equals the in-memory run's, and no second block is ever held."""

import json

import pytest
import torch

import signround
from signround.cli import main
from signround.model.lazy import BlockStream
from tests.conftest import build_tokenizer, corpus, make_config, make_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 4-block LLaMA saved in several safetensors shards (index json), its tokenizer and calibration."""
    root = tmp_path_factory.mktemp("lowmem")
    model = root / "model"
    make_model("llama", layers=4).save_pretrained(model, max_shard_size="60KB")
    build_tokenizer().save_pretrained(model)
    assert (model / "model.safetensors.index.json").is_file()
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(40, seed=1)))
    return model, calib


def argv(model, out, calib, *extra):
    return ["quantize", "--model", str(model), "--output", str(out), "--dataset", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--batch-size", "2", "--iters", "3", "--group-size", "32", "--quiet", *extra]  # fmt: skip


def logits(folder):
    model, _ = signround.load_model(str(folder))
    ids = torch.arange(2, 40).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits, model


@pytest.mark.parametrize("extra", [(), ("--method", "rtn"), ("--act-bits", "8", "--act-granularity", "channel")])
def test_streamed_run_equals_the_in_memory_run(tmp_path, sharded, monkeypatch, extra):
    model, calib = sharded
    assert main(argv(model, tmp_path / "ref", calib, *extra)) == 0
    held = []
    original = BlockStream.materialize

    def spy(self, i):
        loaded = [j for j, b in enumerate(self.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        others = [j for j in loaded if j != i]
        held.append(others)
        return original(self, i)

    monkeypatch.setattr(BlockStream, "materialize", spy)
    assert main(argv(model, tmp_path / "low", calib, "--low-memory", *extra)) == 0
    assert len(held) == 4 and all(not h for h in held)  # every block loaded once, never beside another one
    assert not (tmp_path / "low.signround-run").exists()
    assert json.loads((tmp_path / "low" / "model.safetensors.index.json").read_text())["weight_map"]
    ref, ref_model = logits(tmp_path / "ref")
    low, low_model = logits(tmp_path / "low")
    assert torch.equal(ref, low)
    assert ref_model.config.quantization_config["modules"] == low_model.config.quantization_config["modules"]


def test_default_run_reads_each_block_when_its_turn_comes(tmp_path, sharded, monkeypatch):
    """Without --low-memory a float safetensors folder is still loaded block by block (never memory-mapped
    whole); the finished blocks stay in memory. The result equals the Python API's run on a whole model."""
    model, calib = sharded
    later_loaded = []
    original = BlockStream.materialize

    def spy(self, i):
        assert self.keep
        later_loaded.append(any(p.device.type != "meta" for b in self.blocks[i:] for p in b.parameters()))
        return original(self, i)

    monkeypatch.setattr(BlockStream, "materialize", spy)
    assert main(argv(model, tmp_path / "cli", calib)) == 0
    assert later_loaded == [False] * 4  # block i and the ones after it were still on the meta device

    whole, tokenizer = signround.load_model(str(model))
    scheme = signround.QuantScheme(bits=4, group_size=32)
    cfg = make_config(scheme=scheme, iters=3, nsamples=4, seqlen=32, batch_size=2)
    signround.quantize(whole, tokenizer, cfg, str(calib), signround.RunOptions(progress=False))
    signround.save(whole, tokenizer, tmp_path / "api")
    cli, _ = logits(tmp_path / "cli")
    api, _ = logits(tmp_path / "api")
    assert torch.equal(cli, api)


def test_low_memory_refuses_what_needs_the_whole_model(tmp_path, sharded, capsys):
    model, calib = sharded
    for extra, match in [
        (("--format", "gptq"), "--low-memory writes the native format"),
        (("--avg-bits", "3.5"), "--low-memory cannot run"),
    ]:
        out = tmp_path / "x"
        assert main(argv(model, out, calib, "--low-memory", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and not out.exists()


def test_low_memory_reports_a_corrupt_shard_in_one_line(tmp_path, sharded, capsys):
    import shutil

    model, calib = sharded
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(argv(broken, tmp_path / "out", calib, "--low-memory")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and not (tmp_path / "out").exists()


def test_streamed_run_resumes_after_a_crash(tmp_path, sharded, monkeypatch):
    from signround.errors import SignRoundError

    model, calib = sharded
    assert main(argv(model, tmp_path / "ref", calib)) == 0
    original = BlockStream.materialize

    def crash_at_2(self, i):
        if i == 2:
            raise SignRoundError("simulated crash")
        return original(self, i)

    monkeypatch.setattr(BlockStream, "materialize", crash_at_2)
    assert main(argv(model, tmp_path / "low", calib, "--low-memory")) == 2
    state = json.loads((tmp_path / "low.signround-run" / "run.json").read_text())
    assert state["done"] == 2 and not (tmp_path / "low").exists()
    monkeypatch.setattr(BlockStream, "materialize", original)
    assert main(argv(model, tmp_path / "low", calib, "--low-memory", "--resume")) == 0
    assert torch.equal(logits(tmp_path / "ref")[0], logits(tmp_path / "low")[0])
