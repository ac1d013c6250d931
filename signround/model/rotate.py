"""Orthogonal rotations folded into a float model's weights (QuaRot / SpinQuant style), before quantization.

The rotated model computes the same function; the weights and the activations the quantizers see are
rotated, which spreads outlier channels over many (the point of QuaRot: 4-bit activations become usable).
Row-vector convention throughout: a linear computes ``y = x W^T`` with ``W [out, in]``.

1. **Norms folded.** Each RMSNorm's scale ``g`` moves into the columns of the linears reading its output
   (``W <- W diag(g)``: q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, the
   ``lm_head`` after the final norm), and ``g`` becomes 1. An RMSNorm with a unit scale commutes with an
   orthogonal ``Q``: ``rms(x Q) = rms(x)``.
2. **Residual stream rotated** by ``Q [d, d]``: the embedding rows ``E <- E Q``; every linear reading the
   stream ``W <- W Q`` (q/k/v, gate/up, lm_head); every linear writing it ``W <- Q^T W`` and ``b <- b Q``
   (o_proj, down_proj). A tied ``lm_head`` is untied first (it now differs from the embedding by the final
   norm's scale), so the checkpoint stores both (``tie_word_embeddings: false``).
3. **Values and attention output rotated per head** by ``H [head_dim, head_dim]``: ``v_proj``'s rows of each
   key-value head ``W_v <- H^T W_v`` (and its bias), ``o_proj``'s columns of each query head ``W_o <- W_o H``.
   Attention mixes tokens, not channels, so each head's output is rotated by the same ``H`` as its values.

With :attr:`Rotation.FOLDED` everything is absorbed: the result is an ordinary model of the same
architecture, which every exporter writes unchanged. :attr:`Rotation.ONLINE` also rotates down_proj's input
(the MLP's hidden state, where SmolLM2's activation outliers live), which no weight can absorb: its weight
becomes ``W <- W Q_i`` and its input ``x <- x Q_i`` at run time (:class:`OnlineHadamard`, a forward pre-hook,
before the input's quantizer). The native format records it (``quantization_config["rotation"]["online"]``)
and its reader applies it; a serving kernel must apply it too (QuaRot's online Hadamard), so every other
format refuses such a model. Not done: the query/key rotation inside attention (only needed for a quantized
KV cache).

``Q`` (and ``H``) is a randomized Hadamard transform: ``diag(s) (R_m kron H_b) / sqrt(b)``. Here ``b`` is the
largest power of two dividing the width, ``H_b`` Sylvester's Hadamard matrix, ``R_m`` a seeded random
orthogonal matrix of the odd factor ``m`` (1 for powers of two; SmolLM2's 576 = 9 x 64), and ``s`` seeded
random signs.

Supported: LLaMA-style decoders (``model.embed_tokens``, ``model.norm``, ``lm_head``, blocks with
``input_layernorm``, ``post_attention_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``
and plain RMSNorms): LLaMA, Mistral, Qwen2, Qwen3, SmolLM. Anything else is refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from signround.act.hadamard import OnlineHadamard, attach, hadamard_factors, sylvester
from signround.config import Rotation
from signround.errors import SignRoundError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_hadamard(width: int, seed: int) -> torch.Tensor:
    """An orthogonal ``[width, width]`` float64 matrix: ``diag(s) (R_m kron H_b) / sqrt(b)`` (module
    docstring), the same for the same ``(width, seed)``."""
    signs, r, b = hadamard_factors(width, seed)
    return signs[:, None] * torch.kron(r, sylvester(b) / b**0.5)


def attach_online(model: nn.Module, record: dict | None) -> None:
    """Attach the online rotations a checkpoint's ``quantization_config["rotation"]`` lists to every block of
    ``model`` (a loaded model; nothing happens without a record)."""
    for entry in (record or {}).get("online", []):
        if entry.get("kind") != "randomized-hadamard":
            raise SignRoundError(f"unknown online rotation {entry!r} in the checkpoint config; upgrade signround")
        op = OnlineHadamard(int(entry["width"]), int(entry["seed"]))
        for block in model.model.layers:
            attach(block.get_submodule(entry["module"]), op)


def _is_plain_rmsnorm(module: nn.Module) -> bool:
    """An RMSNorm whose output is ``x / rms(x) * weight`` (not Gemma's ``* (1 + weight)``), with no bias."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and getattr(module, "bias", None) is None


def check_rotatable(model: nn.Module) -> None:
    """Refuse, in one line, a model :func:`rotate_model` does not handle."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SUPPORTED:
        raise SignRoundError(
            f"--rotate supports LLaMA-style decoders ({', '.join(SUPPORTED)}); this model is {model_type or 'unknown'}"
        )
    inner = getattr(model, "model", None)
    norms = [getattr(inner, "norm", None)]
    for block in getattr(inner, "layers", []):
        names = dict(block.named_modules())
        missing = [n for n in (*READERS, *MLP_READERS, *WRITERS) if not isinstance(names.get(n), nn.Linear)]
        if missing:
            raise SignRoundError(
                f"--rotate needs plain linears {', '.join(missing)} in every block (mixtures of experts are not "
                "supported)"
            )
        norms += [names.get("input_layernorm"), names.get("post_attention_layernorm")]
    if not all(n is not None and _is_plain_rmsnorm(n) for n in norms):
        raise SignRoundError("--rotate folds plain RMSNorm scales; this model has another norm")


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.double() * g[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _right(lin: nn.Linear, q: torch.Tensor) -> None:
    """``W <- W Q`` (the layer reads the rotated stream)."""
    lin.weight.data = (lin.weight.double() @ q).to(lin.weight.dtype)


def _left(lin: nn.Linear, q: torch.Tensor) -> None:
    """``W <- Q^T W``, ``b <- b Q`` (the layer writes the rotated stream)."""
    lin.weight.data = (q.T @ lin.weight.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.double() @ q).to(lin.bias.dtype)


def _untie(model: nn.Module) -> None:
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, mode: Rotation = Rotation.FOLDED) -> dict:
    """Fold the norms and the rotations of the module docstring into ``model``'s weights, in place (float
    weights; before quantization); with ``mode`` ONLINE also rotate every down_proj's input, attaching the
    :class:`OnlineHadamard`. Returns the record written into the checkpoint config."""
    mode = Rotation(mode)
    if mode is Rotation.NONE:
        raise SignRoundError("rotate_model needs a rotation mode, folded or online")
    check_rotatable(model)
    inner = model.model
    _untie(model)
    width = model.config.hidden_size
    q = random_hadamard(width, seed)
    blocks = list(inner.layers)
    attn = blocks[0].self_attn
    head_dim = int(getattr(attn, "head_dim", 0) or width // model.config.num_attention_heads)
    h = random_hadamard(head_dim, seed + 1)
    embed = inner.embed_tokens
    embed.weight.data = (embed.weight.double() @ q).to(embed.weight.dtype)
    for block in blocks:
        mods = dict(block.named_modules())
        _fold_norm(block.input_layernorm, [mods[n] for n in READERS])
        _fold_norm(block.post_attention_layernorm, [mods[n] for n in MLP_READERS])
        for n in (*READERS, *MLP_READERS):
            _right(mods[n], q)
        for n in WRITERS:
            _left(mods[n], q)
        v, o = mods["self_attn.v_proj"], mods["self_attn.o_proj"]
        kv_heads, heads = v.out_features // head_dim, o.in_features // head_dim
        v_blocks = torch.block_diag(*[h] * kv_heads)  # rows of each kv head: W_v <- H^T W_v
        v.weight.data = (v_blocks.T @ v.weight.double()).to(v.weight.dtype)
        if v.bias is not None:
            v.bias.data = (v.bias.double() @ v_blocks).to(v.bias.dtype)
        o.weight.data = (o.weight.double() @ torch.block_diag(*[h] * heads)).to(o.weight.dtype)
    _fold_norm(inner.norm, [model.lm_head])
    _right(model.lm_head, q)
    online = []
    if mode is Rotation.ONLINE:
        down = blocks[0].mlp.down_proj
        op = OnlineHadamard(down.in_features, seed + 2)
        q_in = random_hadamard(down.in_features, seed + 2)
        for block in blocks:
            _right(block.mlp.down_proj, q_in)  # W <- W Q_i; its input becomes x Q_i at run time
            attach(block.mlp.down_proj, op)
        online.append(op.record("mlp.down_proj"))
    return {"kind": "randomized-hadamard", "mode": mode.value, "seed": seed, "residual": width,
            "head_dim": head_dim, "online": online}  # fmt: skip
