import math

import pytest
import torch

from signround.calib.capture import capture_block_inputs
from signround.config import QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.model.blocks import find_blocks, resolve_schemes
from signround.pipeline import _run_block
from signround.tune.signround import BlockData, TuneHooks, block_mse, output_loss, token_errors, tune_block
from tests.conftest import make_model


def _block_setup(bits=2):
    model = make_model("llama", layers=1)
    _, blocks = find_blocks(model)
    tokens = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    x, kw = capture_block_inputs(model, blocks[0], tokens)
    y = _run_block(blocks[0], x, kw, 8)
    schemes = resolve_schemes("model.layers.0", blocks[0], QuantScheme(bits=bits, group_size=32))
    return blocks[0], x, y, kw, schemes


def _weights(block, result):
    from signround.formats import int_affine
    from signround.primitives import from_groups, to_groups

    out = {}
    for name, layer in result.layers.items():
        codes = to_groups(layer.codes, layer.scheme.group_size)
        w = int_affine.dequantize_codes(codes, layer.scale.float(), layer.zero.float())
        out[f"{name}.weight"] = from_groups(w, layer.codes.shape[1])
    return out


@pytest.mark.parametrize("loss", ["relative", "mse"])
def test_signround_beats_rtn_on_block_output(loss):
    block, x, y, kw, schemes = _block_setup()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    rtn = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=0, loss=loss), seed=0)
    sr = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=60, batch_size=4, loss=loss), seed=0)
    loss_rtn = block_mse(block, x, y, kw, 8, _weights(block, rtn), loss)
    loss_sr = block_mse(block, x, y, kw, 8, _weights(block, sr), loss)
    # a tuning run measures the RTN loss it starts from; a plain RTN run leaves that to the caller
    assert abs(loss_rtn - sr.rtn_loss) < 1e-6 * max(1.0, loss_rtn)
    assert math.isnan(rtn.rtn_loss) and rtn.steps == 0
    assert loss_sr < 0.9 * loss_rtn
    assert sr.steps == 60 and sr.best_loss <= sr.first_loss
    # the float block is left untouched and trainable again
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert all(p.requires_grad for p in block.parameters())


def test_tuning_is_deterministic_for_a_seed():
    block, x, y, kw, schemes = _block_setup(bits=3)
    cfg = TuneConfig(iters=10, batch_size=4)
    a = tune_block(block, BlockData(x, y, kw), schemes, cfg, seed=3)
    b = tune_block(block, BlockData(x, y, kw), schemes, cfg, seed=3)
    assert a.losses == b.losses
    assert all(torch.equal(a.layers[n].codes, b.layers[n].codes) for n in a.layers)


def test_best_step_is_kept_by_default_and_use_last_takes_no_copies(monkeypatch):
    from signround.tune.wrapper import TunableWeight

    calls = {"snapshot": 0, "restore": 0}
    for method in calls:
        original = getattr(TunableWeight, method)

        def counted(self, *a, _original=original, _method=method):
            calls[_method] += 1
            return _original(self, *a)

        monkeypatch.setattr(TunableWeight, method, counted)
    block, x, y, kw, schemes = _block_setup()
    assert TuneConfig().use_best is True
    last = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=20, batch_size=4, use_best=False), seed=0)
    assert calls == {"snapshot": 0, "restore": 0}  # no copies taken, the last step's parameters finalized
    best = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=20, batch_size=4), seed=0)
    assert calls["snapshot"] >= len(schemes) and calls["restore"] == len(schemes)
    assert best.losses == last.losses  # same run; only the kept step differs
    assert best.best_loss == min(best.losses) == last.best_loss
    assert best.best_step == last.best_step == best.losses.index(min(best.losses))


def test_amp_tuning_runs_in_bfloat16_and_still_beats_rtn():
    block, x, y, kw, schemes = _block_setup()
    rtn = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=0), seed=0)
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        amp = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=60, batch_size=4, amp=True), seed=0)
    finally:
        handle.remove()
    assert torch.bfloat16 in seen  # the steps' matmuls ran in bfloat16
    loss_rtn = block_mse(block, x, y, kw, 8, _weights(block, rtn))
    loss_amp = block_mse(block, x, y, kw, 8, _weights(block, amp))  # scored in float32
    assert loss_amp < 0.9 * loss_rtn
    assert all(layer.scale.dtype == torch.float16 for layer in amp.layers.values())


def test_relative_loss_weighs_every_token_alike():
    target = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    target[:, 0] *= 1000.0  # a token with massive activations, as at the attention-sink position
    out = target * 1.1  # the same 10% error on every token
    mse, rel = token_errors(out, target, "mse"), token_errors(out, target, "relative")
    assert mse.shape == rel.shape == (2, 5)
    assert torch.allclose(rel, torch.full_like(rel, 0.01), rtol=1e-4)
    assert bool((mse[:, 0] > 1e5 * mse[:, 1:].max()).all())  # plain MSE: token 0 outweighs all others
    assert torch.allclose(rel, mse / target.pow(2).mean(-1))
    assert abs(output_loss(out, target, "relative", batch_size=1) - 0.01) < 1e-6
    assert abs(output_loss(out, target, "mse", batch_size=1) - torch.nn.functional.mse_loss(out, target).item()) < 1e-3


def test_drop_largest_leaves_out_exactly_the_largest_errors_and_their_gradient():
    from signround.tune.signround import drop_largest

    sq = torch.rand(4, 50, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    kept = drop_largest(sq, 0.01)  # 20 of 2000 elements
    dropped = kept.detach() == 0
    assert int(dropped.sum()) == 20
    assert float(sq.detach()[dropped].min()) > float(sq.detach()[~dropped].max())
    kept.sum().backward()
    assert torch.equal(sq.grad, (~dropped).float())
    assert drop_largest(sq, 0.0) is sq
    assert int((drop_largest(sq.detach(), 1e-9) == 0).sum()) == 1  # at least one element goes
    # in the per-token loss the dropped errors count as 0 and the mean still divides by the hidden width
    out, target = torch.zeros(1, 2, 4), torch.tensor([[[1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0]]])
    torch.testing.assert_close(token_errors(out, target, drop=0.125), torch.tensor([[0.75, 1.0]]))


def test_drop_outliers_changes_the_tuning_not_the_reported_losses():
    block, x, y, kw, schemes = _block_setup(bits=2)
    x = x.clone()
    x[:, 3] *= 50.0  # one position with outlier outputs, which the plain loss is steered by
    y = _run_block(block, x, kw, 8)
    plain = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=20, batch_size=4), seed=0)
    drop = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=20, batch_size=4, drop_outliers=0.01),
                      seed=0)  # fmt: skip
    assert any(not torch.equal(plain.layers[n].codes, drop.layers[n].codes) for n in plain.layers)
    # the start is the same full-error measurement; the step losses are the smaller, dropped ones
    assert drop.rtn_loss == plain.rtn_loss
    assert drop.losses[0] < plain.losses[0]
    with pytest.raises(SignRoundError, match=r"drop_outliers is a fraction of the errors in \[0, 0.5\)"):
        TuneConfig(drop_outliers=0.5)


def test_unknown_loss_is_refused():
    with pytest.raises(SignRoundError, match="loss must be one of relative, mse"):
        TuneConfig(loss="l1")


def test_sign_step_in_backward_equals_step_after_and_frees_each_gradient():
    """The in-backward sign step lands where sign_step after backward does, and no parameter's gradient is
    still held when the next one's arrives."""
    from signround.tune.optim import SignStepInBackward, sign_step

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    w1, w2 = torch.randn(16, 16), torch.randn(16, 4)

    def loss(a, b):
        return ((x @ (w1 + a)).tanh() @ (w2 + b)).pow(2).mean()

    ref = [torch.zeros(16, 16, requires_grad=True), torch.zeros(16, 4, requires_grad=True)]
    new = [p.detach().clone().requires_grad_(True) for p in ref]
    held = []
    with SignStepInBackward(new) as hook:
        for step in range(3):
            loss(*ref).backward()
            sign_step(ref, 0.1 / (step + 1))
            hook.lr = 0.1 / (step + 1)
            for p in new:
                p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in new)))
            loss(*new).backward()
            assert all(p.grad is None for p in new)
    assert all(torch.equal(a, b) for a, b in zip(ref, new, strict=True))
    assert held and max(held) == 0  # after each step no gradient is held, the arriving one included


def test_reading_losses_every_few_steps_changes_nothing_but_when():
    block, x, y, kw, schemes = _block_setup(bits=3)
    cfg = TuneConfig(iters=12, batch_size=4, use_best=False)
    seen: dict[int, list] = {1: [], 5: []}
    runs = {
        k: tune_block(
            block,
            BlockData(x, y, kw),
            schemes,
            cfg,
            seed=1,
            hooks=TuneHooks(on_step=lambda s, v, k=k: seen[k].append((s, v)), sync_every=k),
        )  # fmt: skip
        for k in seen
    }
    assert runs[1].losses == runs[5].losses and len(runs[5].losses) == 12
    assert seen[1] == seen[5] == list(enumerate(runs[1].losses))  # every step reported, in order
    assert runs[1].best_step == runs[5].best_step
    assert all(torch.equal(runs[1].layers[n].codes, runs[5].layers[n].codes) for n in schemes)


def test_a_non_finite_loss_names_its_step_even_when_read_late():
    block, x, y, kw, schemes = _block_setup()
    bad = x.clone()
    bad[:] = float("nan")
    with pytest.raises(SignRoundError, match="became nan at step 0"):
        tune_block(
            block,
            BlockData(bad, y, kw),
            schemes,
            TuneConfig(iters=8, batch_size=4, use_best=False),
            seed=0,
            hooks=TuneHooks(sync_every=5),
        )
    with pytest.raises(SignRoundError, match="sync_every must be 1"):
        tune_block(
            block,
            BlockData(x, y, kw),
            schemes,
            TuneConfig(iters=8, batch_size=4, use_best=True),
            seed=0,
            hooks=TuneHooks(sync_every=5),
        )


def test_torch_compile_tuning_matches_eager():
    """``TuneConfig(torch_compile=True)`` compiles the steps' quantize-dequantize: the same run, up to the
    clipping gradients' summation order (here: the same losses to float rounding and the same codes)."""
    block, x, y, kw, schemes = _block_setup(bits=3)
    eager = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=10, batch_size=4), seed=3)
    comp = tune_block(
        block, BlockData(x, y, kw), schemes, TuneConfig(iters=10, batch_size=4, torch_compile=True), seed=3
    )
    assert comp.losses == pytest.approx(eager.losses, rel=1e-4)
    assert all(torch.equal(eager.layers[n].codes, comp.layers[n].codes) for n in eager.layers)


def test_drop_outliers_default_follows_the_scheme_width_in_the_api():
    from signround.config import QuantConfig, QuantScheme
    from signround.config.stages import auto_drop_outliers

    assert TuneConfig().drop_outliers is None  # unresolved on its own; the run's config decides
    assert [auto_drop_outliers(b) for b in (2, 3, 4, 8)] == [0.001, 0.001, 0.0, 0.0]
    assert QuantConfig(scheme=QuantScheme(bits=3, sym=True)).tune.drop_outliers == 0.001
    assert QuantConfig(scheme=QuantScheme(bits=8)).tune.drop_outliers == 0.0
    assert QuantConfig(scheme=QuantScheme(bits=2), tune=TuneConfig(drop_outliers=0.0)).tune.drop_outliers == 0.0
    assert QuantConfig.from_recipe("fast", scheme=QuantScheme(bits=2)).tune.drop_outliers == 0.001


def test_drop_outliers_flag_reaches_the_config_and_bad_values_are_refused():
    from signround.cli_args import build_parser, quant_config

    def cfg(*flags):
        return quant_config(build_parser().parse_args(["quantize", "--model", "m", "--output", "o", *flags]))

    assert cfg().tune.drop_outliers == 0.0  # 4 bits: off by default
    assert cfg("--drop-outliers", "0.001").tune.drop_outliers == 0.001
    assert cfg("--bits", "3").tune.drop_outliers == 0.001  # below 4 bits: auto-round's 0.1% by default
    assert cfg("--bits", "2", "--sym").tune.drop_outliers == 0.001
    assert cfg("--bits", "3", "--drop-outliers", "0").tune.drop_outliers == 0.0  # 0 turns it off
    assert cfg("--data-type", "fp4_e2m1").tune.drop_outliers == 0.0
    with pytest.raises(SignRoundError, match="drop_outliers is a fraction"):
        cfg("--drop-outliers", "-1")
