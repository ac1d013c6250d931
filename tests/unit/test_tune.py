import math

import pytest
import torch

from signround.calib.capture import capture_block_inputs
from signround.config import QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.model.blocks import find_blocks, resolve_schemes
from signround.pipeline import _run_block
from signround.tune.signround import block_mse, output_loss, token_errors, tune_block
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
    rtn = tune_block(block, x, y, kw, schemes, TuneConfig(iters=0, loss=loss), seed=0)
    sr = tune_block(block, x, y, kw, schemes, TuneConfig(iters=60, batch_size=4, loss=loss), seed=0)
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
    a = tune_block(block, x, y, kw, schemes, cfg, seed=3)
    b = tune_block(block, x, y, kw, schemes, cfg, seed=3)
    assert a.losses == b.losses
    assert all(torch.equal(a.layers[n].codes, b.layers[n].codes) for n in a.layers)


def test_use_last_differs_from_best_only_in_choice():
    block, x, y, kw, schemes = _block_setup()
    best = tune_block(block, x, y, kw, schemes, TuneConfig(iters=20, batch_size=4), seed=0)
    last = tune_block(block, x, y, kw, schemes, TuneConfig(iters=20, batch_size=4, use_best=False), seed=0)
    assert best.losses == last.losses
    assert best.best_loss == min(best.losses)


def test_amp_tuning_runs_in_bfloat16_and_still_beats_rtn():
    block, x, y, kw, schemes = _block_setup()
    rtn = tune_block(block, x, y, kw, schemes, TuneConfig(iters=0), seed=0)
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        amp = tune_block(block, x, y, kw, schemes, TuneConfig(iters=60, batch_size=4, amp=True), seed=0)
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


def test_unknown_loss_is_refused():
    with pytest.raises(SignRoundError, match="loss must be one of relative, mse"):
        TuneConfig(loss="l1")
