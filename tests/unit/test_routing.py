"""--routing teacher: the float model's routing, recorded per sample and replayed in the student's steps."""

from __future__ import annotations

import copy

import pytest
import torch

import signround
from signround.model.experts import RoutingTape, unfuse_experts
from tests.conftest import corpus, make_config
from tests.unit.test_experts import build


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_replayed_routing_is_the_recorded_one_for_the_named_samples(family):
    model = build(family)
    unfuse_experts(model)
    block = model.model.layers[0]
    n, seqlen = 4, 8
    x = torch.randn(n, seqlen, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seqlen)[None]
    kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None, "position_ids": pos}
    tape = RoutingTape()
    with torch.no_grad(), tape.recording(block, seqlen):
        ref = torch.cat([block(x[i : i + 2], **kw) for i in (0, 2)])
    name = "mlp.experts"
    assert tape.index[name].shape == (n, seqlen, 2) and tape.weights[name].shape == (n, seqlen, 2)
    student = copy.deepcopy(block)
    router = student.mlp.gate if family != "gpt_oss" else student.mlp.router
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))  # the student's own router now routes elsewhere
        own = student(x[[3, 1]], **kw)
        with tape.replaying(student):
            tape.batch = torch.tensor([3, 1])
            replayed = student(x[[3, 1]], **kw)
            tape.batch = None
            unreplayed = student(x[[3, 1]], **kw)
    torch.testing.assert_close(replayed, ref[[3, 1]])  # same block weights + the teacher's routing
    assert not torch.allclose(own, ref[[3, 1]])
    torch.testing.assert_close(unreplayed, own)  # batch None: the module's own routing


def test_teacher_routing_is_recorded_in_the_checkpoint_and_changes_the_tuning(tokenizer):
    results = {}
    for routing in ("student", "teacher"):
        model = build("qwen3_moe")
        cfg = make_config(scheme=signround.QuantScheme(bits=3, group_size=16), iters=6, nsamples=4, seqlen=32,
                          batch_size=2, routing=routing)  # fmt: skip
        result = signround.quantize_run(model, tokenizer, cfg, corpus(20, seed=1), signround.RunOptions(progress=False))
        assert model.config.quantization_config["tuning"]["routing"] == routing
        results[routing] = [b.best_loss for b in result.report.blocks]
    assert results["student"] != results["teacher"]
