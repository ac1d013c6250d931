"""The checkpoint names serving engines read for a mixture of experts' per-expert tensors, per family.

signround's module tree (after :func:`signround.model.experts.unfuse_experts`) names expert ``e`` of layer ``i``
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`` and the router ``model.layers.{i}.mlp.gate`` (gpt-oss:
``mlp.router``) in every family. What an exporter writes, by ``config.model_type`` (readers checked against
transformers 5.24's ``conversion_mapping.py`` and vLLM's model loaders):

- ``qwen3_moe``, ``qwen2_moe``, ``olmoe``, ``deepseek_v3`` (and any family not listed): the module tree's names,
  unchanged. transformers fuses ``mlp.experts.*.gate_proj`` / ``up_proj`` / ``down_proj`` on load (its
  ``qwen2_moe`` conversion entry, which these families share); vLLM's loaders map the same names
  (``FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="gate_proj", ...)``). DeepSeek-V3's shared experts
  (``mlp.shared_experts.{gate,up,down}_proj``) are ordinary linears under the same names.
- ``mixtral``: the original Mixtral checkpoint names, ``model.layers.{i}.block_sparse_moe.experts.{e}.w1`` (gate),
  ``.w3`` (up), ``.w2`` (down), router ``model.layers.{i}.block_sparse_moe.gate``. vLLM's ``MixtralModel``
  keeps the module attribute ``block_sparse_moe`` and maps experts with ``ckpt_gate_proj_name="w1"``,
  ``ckpt_up_proj_name="w3"``, ``ckpt_down_proj_name="w2"`` (``get_expert_mapping``); transformers' ``mixtral``
  conversion entry renames ``.block_sparse_moe.`` to ``.mlp.`` and fuses ``.experts.*.w1`` / ``w3`` into
  ``gate_up_proj`` and ``.experts.*.w2`` into ``down_proj``. The ``mlp.experts.{e}.gate_proj`` names load in
  neither.
- ``gpt_oss``: no per-expert names are read. transformers 5.24 has no conversion entry for gpt-oss (its experts
  load only as the fused ``gate_up_proj`` / ``down_proj`` parameters), and vLLM's gpt-oss loader reads only
  the fused tensors (float or MXFP4 blocks) and skips per-expert ones. :func:`per_expert_unreadable` says so.

Names are plain strings: a module name (``model.layers.0.mlp.experts.3.up_proj``) or a tensor name (the same
with ``.weight_packed``, ``.qweight``, ...); both map the same way.
"""

from __future__ import annotations

# Mixtral's checkpoint name of each per-expert projection.
MIXTRAL_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
MIXTRAL_MODULE = "block_sparse_moe"
_MIXTRAL_BACK = {v: p for p, v in MIXTRAL_PROJECTIONS.items()}

UNREADABLE = {
    "gpt_oss": (
        "no reader loads gpt-oss experts stored one linear per expert (transformers fuses only float "
        "gate_up_proj/down_proj; vLLM reads only fused or MXFP4 experts)"
    ),
}


def _mlp_index(parts: list[str]) -> int | None:
    """Index of the ``mlp`` part of a name ``...layers.{i}.mlp...``, or None."""
    for k in range(2, len(parts)):
        if parts[k] == "mlp" and parts[k - 1].isdigit() and parts[k - 2] == "layers":
            return k
    return None


def serving_name(model_type: str, name: str) -> str:
    """The name serving engines read for the module or tensor ``name`` of signround's module tree, in a model of
    ``model_type`` (``config.model_type``); unchanged for families that read the module tree's names.

    ``serving_name("mixtral", "model.layers.1.mlp.experts.3.up_proj.weight_packed")`` is
    ``"model.layers.1.block_sparse_moe.experts.3.w3.weight_packed"``; ``"model.layers.1.mlp.gate.weight"`` becomes
    ``"model.layers.1.block_sparse_moe.gate.weight"``.
    """
    if model_type != "mixtral":
        return name
    parts = name.split(".")
    k = _mlp_index(parts)
    if k is None:
        return name
    parts[k] = MIXTRAL_MODULE
    if len(parts) > k + 3 and parts[k + 1] == "experts" and parts[k + 2].isdigit():
        parts[k + 3] = MIXTRAL_PROJECTIONS.get(parts[k + 3], parts[k + 3])
    return ".".join(parts)


def module_name(model_type: str, name: str) -> str:
    """Inverse of :func:`serving_name`: the module-tree name of a checkpoint name (for readers)."""
    if model_type != "mixtral":
        return name
    parts = name.split(".")
    for k in range(2, len(parts)):
        if parts[k] == MIXTRAL_MODULE and parts[k - 1].isdigit() and parts[k - 2] == "layers":
            parts[k] = "mlp"
            if len(parts) > k + 3 and parts[k + 1] == "experts" and parts[k + 2].isdigit():
                parts[k + 3] = _MIXTRAL_BACK.get(parts[k + 3], parts[k + 3])
            break
    return ".".join(parts)


def per_expert_unreadable(model_type: str) -> str | None:
    """Why no reader loads per-expert quantized experts of ``model_type`` (None: they are read)."""
    return UNREADABLE.get(model_type)
