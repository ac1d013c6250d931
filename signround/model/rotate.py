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

Everything is absorbed: the result is an ordinary model of the same architecture, which every exporter
writes unchanged. Not done (QuaRot does it with an *online* Hadamard, a run-time op that a serving kernel
must apply): down_proj's input (the MLP's hidden state) and the query/key rotation inside attention; their
outlier channels stay as they were.

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

from signround.errors import SignRoundError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix ``[n, n]`` (entries +-1) for ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(width: int, seed: int) -> torch.Tensor:
    """An orthogonal ``[width, width]`` float64 matrix: ``diag(s) (R_m kron H_b) / sqrt(b)`` (module
    docstring), the same for the same ``(width, seed)``."""
    b = width & -width  # the largest power of two dividing width
    m = width // b
    gen = torch.Generator().manual_seed(seed)
    r = torch.ones(1, 1, dtype=torch.float64)
    if m > 1:
        r, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    signs = torch.randint(0, 2, (width,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(r.contiguous(), sylvester(b) / b**0.5)


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
def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Fold the norms and the rotations of the module docstring into ``model``'s weights, in place (float
    weights; before quantization). Returns the record written into the checkpoint config."""
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
    return {"kind": "randomized-hadamard", "seed": seed, "residual": width, "head_dim": head_dim, "online": []}
