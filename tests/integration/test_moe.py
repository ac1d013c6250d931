"""Mixture-of-experts families end to end on tiny random-init models: the fused experts are unfused into one
linear per expert, every expert is quantized (none left float), the native checkpoint reloads with the same
logits, the streamed (--low-memory) run writes the same tensors as the whole-model one, and the exporters' per-expert
names are the ones readers expect (the compressed-tensors loads themselves: tests/integration/test_families.py)."""

from __future__ import annotations

import json
import logging
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import signround
from signround.cli import main
from signround.export.ct import check_ct
from signround.export.moe_names import module_name, per_expert_unreadable, serving_name
from signround.model.accounting import Fate
from signround.model.blocks import Planned
from signround.model.experts import unfuse_experts
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config
from tests.integration.test_resume import spawn
from tests.unit.test_experts import MOE_LAYERS, build

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "olmoe", "deepseek_v3"]
QUIET = signround.RunOptions(progress=False)


def _cfg():
    return make_config(scheme=signround.QuantScheme(bits=4, group_size=16), iters=2, nsamples=4, seqlen=32,
                       batch_size=2)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_quantized_and_the_checkpoint_reloads(family, tokenizer, tmp_path):
    model = build(family)
    result = signround.quantize_run(model, tokenizer, _cfg(), corpus(20, seed=1), QUIET)
    weights = result.plan.weights
    assert not weights.of(Fate.UNSUPPORTED)
    experts = [n for n, m in model.named_modules() if ".mlp.experts." in n and isinstance(m, QuantLinear)]
    layers = MOE_LAYERS.get(family, [0, 1])
    assert len(experts) == len(layers) * 4 * 3  # 4 experts x gate/up/down in every MoE layer
    assert f"model.layers.{layers[0]}.mlp.experts.3.down_proj" in experts
    for b in result.report.blocks:  # every calibration token routed to top-k = 2 experts of each MoE layer
        if b.index in layers:
            assert list(b.expert_tokens) == ["mlp.experts"] and sum(b.expert_tokens["mlp.experts"]) == 4 * 32 * 2
        else:
            assert b.expert_tokens is None  # DeepSeek-V3's dense first layer
    floats = {f.why for f in weights.fates if f.fate is not Fate.QUANTIZED}
    assert floats <= {"norm/bias", "router"}  # routers stay float by default; nothing else is left float
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).logits
    signround.save(model, tokenizer, tmp_path / "q")
    reloaded, _ = signround.load_model(str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)


def _tensors(folder):
    """Every tensor of a checkpoint folder (one file, or the streamed run's shards)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def float_run_args(family: str, tokenizer, tmp_path, iters: int) -> list[str]:
    """Save a tiny ``family`` model and a calibration file under ``tmp_path``; the ``quantize`` flags (no
    ``--output``) of a W4G16 run of ``iters`` steps on them."""
    build(family).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(20, seed=1)))
    return ["quantize", "--model", str(tmp_path / "float"), "--bits", "4", "--group-size", "16", "--iters",
            str(iters), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--dataset",
            str(tmp_path / "calib.jsonl"), "--quiet"]  # fmt: skip


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # per-expert and fused names on disk
def test_streamed_and_whole_runs_write_the_same_moe_checkpoint(family, tokenizer, tmp_path):
    argv = float_run_args(family, tokenizer, tmp_path, iters=2)
    assert main([*argv, "--output", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--low-memory", "--output", str(tmp_path / "streamed")]) == 0
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys() and "model.layers.1.mlp.experts.3.up_proj.qweight" in whole
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_serving_names_are_the_names_transformers_saves(family, tmp_path):
    """signround.export.moe_names.serving_name maps the unfused module tree onto exactly the per-expert names
    transformers' own save of the float model writes (its original checkpoint format: Mixtral's
    block_sparse_moe.experts.{e}.w1/w3/w2, the module tree's names elsewhere), and module_name inverts it."""
    model = build(family)
    model.save_pretrained(tmp_path)
    saved = set(load_file(str(tmp_path / "model.safetensors")))
    unfuse_experts(model)
    names = list(model.state_dict())
    assert {serving_name(family, n) for n in names} == saved
    assert all(module_name(family, serving_name(family, n)) == n for n in names)
    assert any(".experts.3." in n for n in saved)  # per-expert names, not the fused module's


def test_gpt_oss_has_no_per_expert_names_to_serve(tmp_path):
    """transformers saves gpt-oss's experts fused only (no conversion to per-expert names), which is why the
    compressed-tensors exporter refuses it (tests/integration/test_families.py)."""
    model = build("gpt_oss")
    model.save_pretrained(tmp_path)
    saved = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.0.mlp.experts.gate_up_proj" in saved and not [n for n in saved if ".experts.0." in n]
    assert per_expert_unreadable("gpt_oss") and per_expert_unreadable("mixtral") is None


def _planned_experts(model, sym: bool) -> list[Planned]:
    scheme = signround.QuantScheme(bits=4, group_size=16, sym=sym)
    return [Planned(n, scheme, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".experts." in n]  # fmt: skip


def test_asymmetric_experts_are_warned_about_before_a_compressed_tensors_run(caplog):
    """transformers 5.24 cannot load asymmetric experts (its expert decompression drops weight_zero_point) and
    most vLLM releases refuse them: the check says so once, naming the count and --sym."""
    model = build("olmoe")
    unfuse_experts(model)
    with caplog.at_level(logging.WARNING, logger="signround"):
        check_ct(model, _planned_experts(model, sym=True))
        assert not caplog.records
        check_ct(model, _planned_experts(model, sym=False))
    (record,) = caplog.records
    assert f"{2 * 4 * 3} asymmetric expert layers" in record.getMessage() and "--sym" in record.getMessage()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_moe_run_killed_after_its_first_block_resumes_to_the_same_bytes(family, tokenizer, tmp_path):
    """SIGKILL right after block 0 is saved, then ``--resume``: the same checkpoint bytes and the same run report
    (per-expert token counts and starved experts included) as an uninterrupted run."""
    argv = [*float_run_args(family, tokenizer, tmp_path, iters=3), "--expert-min-tokens", "64"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*argv, "--output", str(ref), "--report", str(tmp_path / "ref.json")]) == 0
    driver = (
        "import os, signal, sys\n"
        "from signround.runstate import RunState\n"
        "save = RunState.save_block\n"
        "def save_then_die(self, *a, **k):\n"
        "    save(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "RunState.save_block = save_then_die\n"
        "from signround.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    assert spawn([*argv, "--output", str(out)], driver).wait(timeout=300) == -signal.SIGKILL and not out.exists()
    assert main([*argv, "--output", str(out), "--resume", "--report", str(tmp_path / "out.json")]) == 0
    got, want = _tensors(out), _tensors(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    blocks = [json.loads((tmp_path / f"{r}.json").read_text())["blocks"] for r in ("ref", "out")]
    strip = [[{k: v for k, v in b.items() if k != "seconds"} for b in bs] for bs in blocks]
    assert strip[0] == strip[1] and any(b["expert_tokens"] for b in strip[0])
    assert any(b.get("starved") for b in strip[0]), "no starved expert: the resumed report's entries went untested"
