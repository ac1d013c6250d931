"""Allocation units of a mixture of experts: which expert linears share one bit width.

Every serving engine stores a MoE layer's experts fused, with one quantization scheme for all of them:

- vLLM's ``FusedMoE`` takes one quant method per layer (prefix ``model.layers.{i}.mlp.experts``), holding
  gate+up of all experts as ``w13_*`` ``[E, ...]`` and down as ``w2_*``, packed at one width:
  ``GPTQMarlinConfig.get_quant_method`` / ``get_moe_quant_method`` (gptq_marlin.py) apply one (bits, group
  size, sym) to ``w13`` and ``w2``; ``INCConfigParser._resolve_raw`` (auto-round checkpoints) raises "Fused MoE
  layer ... requires consistent quant config for all sub-layers" when the ``extra_config`` entries under the
  layer differ; ``CompressedTensorsMoEMethod.get_moe_method`` requires gate, up and down to share one scheme.
- llama.cpp's GGUF stores ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, one type per tensor.

So by default (:attr:`ExpertUnits.LAYER`) all expert linears of one experts module (gate, up and down of every
expert) are one allocation unit: one width, measured and sized as a whole. :attr:`ExpertUnits.EXPERT` gives each
expert its own units (gate+up, and down), which only signround's native format can hold.

Grouping is structural (module names), not from the forward hooks that find q/k/v: an expert the grouping
sample routes no token to would otherwise split its gate from its up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from signround.config.choices import ExpertUnits
from signround.model.experts import UnfusedExperts

__all__ = ["ExpertUnits", "expert_units", "experts_modules", "unit_label", "whole_layer_pattern"]

_PROJECTIONS = "(?:gate_proj|up_proj|down_proj)"


def experts_modules(block: nn.Module) -> dict[str, int]:
    """``{relative name: number of experts}`` of every :class:`UnfusedExperts` inside ``block``."""
    return {n: len(m) for n, m in block.named_modules() if isinstance(m, UnfusedExperts)}


def _owner(name: str, modules: Iterable[str]) -> str | None:
    return next((p for p in modules if name.startswith(p + ".")), None)


def expert_units(block: nn.Module, groups: list[list[str]], mode: ExpertUnits = ExpertUnits.LAYER) -> list[list[str]]:
    """``groups`` (relative linear names of ``block``, from :func:`~signround.mixed.sensitivity.fused_groups`)
    with every expert linear moved into its unit (see the module docstring); other groups are unchanged.

    A unit takes the place of the first group that held one of its members; members keep their order."""
    modules = experts_modules(block)
    if not modules:
        return groups
    out: list[list[str]] = []
    units: dict[tuple, list[str]] = {}
    for group in groups:
        rest = [n for n in group if _owner(n, modules) is None]
        if rest:
            out.append(rest)
        for name in group:
            owner = _owner(name, modules)
            if owner is None:
                continue
            if mode is ExpertUnits.LAYER:
                key: tuple = (owner,)
            else:
                expert, proj = name[len(owner) + 1 :].split(".", 1)
                key = (owner, expert, proj == "down_proj")
            if key not in units:
                units[key] = []
                out.append(units[key])
            units[key].append(name)
    return out


_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")


def whole_layer_pattern(names: list[str], n_experts: dict[str, int]) -> str | None:
    """A regex matching exactly ``names`` (full names) when they are every projection of every expert of one
    experts module (``n_experts``: full module name -> experts), else None. Lets one layer rule stand for the
    whole unit instead of one rule per linear (a 128-expert, 48-layer model has 18,432 expert linears)."""
    parts = [_EXPERT_NAME.match(n) for n in names]
    if not parts or not all(parts) or len({m[1] for m in parts}) != 1:
        return None
    module = parts[0][1]
    count = n_experts.get(module)
    if count is None or {(int(m[2]), m[3]) for m in parts} != {
        (e, p) for e in range(count) for p in ("gate_proj", "up_proj", "down_proj")
    }:
        return None
    return rf"^{re.escape(module)}\.\d+\.{_PROJECTIONS}$"


def unit_label(names: list[str]) -> str:
    """Short description of a group for the allocation table: expert units as ``<module>.{E experts}.<projs>``."""
    parts = [_EXPERT_NAME.match(n) for n in names]
    if len(names) <= 3 or not all(parts) or len({m[1] for m in parts}) != 1:
        return ", ".join(names)
    experts = sorted({int(m[2]) for m in parts})
    projs = "/".join(dict.fromkeys(m[3] for m in parts))
    return f"{parts[0][1]}.{{{len(experts)} experts}}.{projs} ({len(names)} linears)"
