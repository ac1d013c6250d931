"""Mixed precision: exact budgets, optimality of the integer program, fused groups, sensitivities."""

import itertools

import numpy as np
import pytest
import torch

from signround.calib.data import sample_tokens
from signround.config import CalibConfig, LayerRule, QuantConfig, QuantScheme
from signround.errors import SignRoundError
from signround.mixed import MixedSpec, allocate_bits, budget_bits, layer_bits, parse_size, solve_greedy, solve_ilp
from signround.mixed.allocate import total_size
from tests.conftest import corpus, make_config, make_model


def test_layer_bits_counts_codes_scales_and_zeros():
    # 8 x 100 weight, groups of 32 -> 4 groups per row (the last one partial).
    assert layer_bits(QuantScheme(bits=3, group_size=32, sym=True), 8, 100) == 3 * 800 + 16 * 8 * 4
    assert layer_bits(QuantScheme(bits=3, group_size=32, sym=False), 8, 100) == 3 * 800 + (16 + 3) * 8 * 4
    assert layer_bits(QuantScheme(bits=4, group_size=-1, sym=False), 8, 100) == 4 * 800 + 20 * 8
    assert layer_bits(None, 8, 100) == 16 * 800


def test_parse_size_and_budget():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(SignRoundError, match="60MB"):
        parse_size("sixty megs")
    assert budget_bits([100, 300], avg_bits=3.0) == 1200
    assert budget_bits([100], target_bytes=1000, fixed_bits=800) == 7200
    with pytest.raises(SignRoundError, match="larger size"):
        budget_bits([100], target_bytes=10, fixed_bits=800)
    with pytest.raises(SignRoundError, match="exactly one"):
        budget_bits([100], avg_bits=3.0, target_bytes=10)


def brute_force(cost, size, budget):
    best, arg = np.inf, None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        c = np.array(choice)
        if total_size(size, c) <= budget and cost[np.arange(len(c)), c].sum() < best:
            best, arg = cost[np.arange(len(c)), c].sum(), c
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_ilp_is_optimal_and_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(seed)
    groups, opts = 6, 4
    bits = np.array([2, 3, 4, 8])
    numel = rng.integers(1_000, 50_000, size=groups)
    size = numel[:, None] * bits[None, :] + rng.integers(0, 500, size=(groups, 1))
    cost = np.sort(rng.random((groups, opts)) * rng.random((groups, 1)) * 10, axis=1)[:, ::-1].copy()
    budget = int(size[:, 0].sum() + rng.random() * (size[:, -1].sum() - size[:, 0].sum()))
    choice = solve_ilp(cost, size, budget)
    assert total_size(size, choice) <= budget
    best, _ = brute_force(cost, size, budget)
    assert cost[np.arange(groups), choice].sum() == pytest.approx(best, rel=1e-9)
    greedy = solve_greedy(cost, size, budget)
    assert total_size(size, greedy) <= budget
    assert cost[np.arange(groups), greedy].sum() >= best - 1e-12


def test_ilp_is_exact_at_a_budget_one_bit_short():
    size = np.array([[200_000_001, 300_000_001], [200_000_000, 300_000_000]])
    cost = np.array([[2.0, 1.0], [2.0, 1.0]])
    budget = int(size[0, 1] + size[1, 1] - 1)  # both at the top would overshoot by one bit
    choice = solve_ilp(cost, size, budget)
    assert total_size(size, choice) <= budget
    assert sorted(choice.tolist()) == [0, 1]


def test_impossible_budget_and_forbidden_options():
    size = np.array([[10, 20], [10, 20]])
    with pytest.raises(SignRoundError, match="smallest possible size"):
        solve_ilp(np.ones((2, 2)), size, 19)
    cost = np.array([[np.inf, 1.0], [5.0, 1.0]])  # option 0 forbidden for group 0
    assert solve_ilp(cost, size, 30).tolist() == [1, 0]


def test_spec_validation():
    with pytest.raises(SignRoundError, match="exactly one"):
        MixedSpec()
    with pytest.raises(SignRoundError, match="out of range"):
        MixedSpec(bit_options=(1, 4), avg_bits=3)
    with pytest.raises(SignRoundError, match="solver"):
        MixedSpec(avg_bits=3, solver="anneal")
    assert MixedSpec(bit_options=(8, 2, 4, 2), avg_bits=3).bit_options == (2, 4, 8)


def tiny_tokens(tokenizer, n=8):
    return sample_tokens(corpus(40, seed=1), tokenizer, CalibConfig(nsamples=n, seqlen=32))


@pytest.mark.parametrize(
    "family,fused",
    [
        ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]),
        ("opt", [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"]]),
    ],
)
@pytest.mark.parametrize("sensitivity", ["block", "block-mse", "fisher"])
def test_allocation_shares_bits_in_fused_groups_and_meets_the_budget(tokenizer, family, fused, sensitivity):
    model = make_model(family)
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=32))
    alloc = allocate_bits(model, tiny_tokens(tokenizer), cfg, MixedSpec(avg_bits=3.0, sensitivity=sensitivity), False)
    assert alloc.avg_bits <= 3.0
    assert total_size(alloc.size, alloc.choice) <= alloc.budget
    prefix = "model.decoder.layers" if family == "opt" else "model.layers"
    for block in range(2):
        for names in fused:
            full = [f"{prefix}.{block}.{n}" for n in names]
            assert full in alloc.groups
    bits = alloc.layer_bits()
    for group in alloc.groups:
        assert len({bits[n] for n in group}) == 1
    # More bits never hurt: the sensitivity falls with the width in every group.
    assert (np.diff(alloc.cost, axis=1) <= 0).all()
    # The rules reproduce the allocation, after any user rules.
    rules = {r.pattern: r.scheme.bits for r in alloc.rules()}
    assert len(rules) == len(bits)


def test_output_fisher_is_the_squared_loss_gradient_at_each_block_output(tokenizer):
    from signround.mixed.sensitivity import output_fisher
    from signround.model.blocks import find_blocks

    model = make_model("llama")
    _, blocks = find_blocks(model)
    tokens = tiny_tokens(tokenizer, n=2)
    weights = output_fisher(model, blocks, tokens)
    assert [tuple(w.shape) for w in weights] == [(2, 32, model.config.hidden_size)] * len(blocks)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # Reference: plain autograd with retained gradients, sequence by sequence.
    for row in range(2):
        outs = []

        def keep(_m, _a, o, outs=outs):
            out = o[0] if isinstance(o, tuple) else o
            out.retain_grad()
            outs.append(out)

        handles = [b.register_forward_hook(keep) for b in blocks]
        ids = tokens[row : row + 1]
        try:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        finally:
            for h in handles:
                h.remove()
        model.zero_grad(set_to_none=True)
        for i, o in enumerate(outs):
            ref = (o.grad[0].float() ** 2).to(torch.bfloat16)
            assert torch.equal(weights[i][row], ref)


def test_user_rules_are_respected(tokenizer):
    model = make_model("llama")
    base = QuantScheme(bits=4, group_size=32)
    cfg = QuantConfig(scheme=base, layer_rules=(LayerRule(r"down_proj", None),))
    alloc = allocate_bits(model, tiny_tokens(tokenizer), cfg, MixedSpec(avg_bits=2.8), False)
    assert not any("down_proj" in n for n in alloc.layer_bits())
    numel = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and "proj" in n and "down" not in n)
    assert alloc.numel == numel


def test_target_size_counts_the_float_parts(tokenizer):
    model = make_model("llama")
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=32))
    tokens = tiny_tokens(tokenizer)
    float_bytes = sum(p.numel() for p in model.parameters()) * 2
    quantized = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    fixed = float_bytes - quantized * 2
    alloc = allocate_bits(model, tokens, cfg, MixedSpec(target_bytes=fixed + quantized * 3 // 8), False)
    assert alloc.budget == (fixed + quantized * 3 // 8) * 8 - fixed * 8
    assert fixed * 8 + total_size(alloc.size, alloc.choice) <= (fixed + quantized * 3 // 8) * 8
    with pytest.raises(SignRoundError, match="larger size"):
        allocate_bits(model, tokens, cfg, MixedSpec(target_bytes=fixed // 2), False)


def test_a_budget_below_the_lowest_option_says_the_minimum(tokenizer):
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=32))
    with pytest.raises(SignRoundError, match=r"smallest possible 2\.5"):
        allocate_bits(make_model("llama"), tiny_tokens(tokenizer), cfg, MixedSpec(avg_bits=2.2), False)


def test_python_api_mixed(tokenizer):
    import signround

    model = make_model("llama")
    spec = MixedSpec(avg_bits=3.0, solver="greedy")
    cfg = make_config(scheme=QuantScheme(bits=4, group_size=32), iters=1, nsamples=4, seqlen=32, mixed=spec)
    signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), signround.RunOptions(progress=False))
    cfg = model.config.quantization_config
    assert cfg["mixed_precision"]["avg_bits"] <= 3.0
    assert {n: m["bits"] for n, m in cfg["modules"].items()} == cfg["mixed_precision"]["layer_bits"]
