"""Mixed precision end to end: measure sensitivities, solve for per-layer bits, emit layer rules.

    spec = MixedSpec(bit_options=(2, 3, 4, 8), avg_bits=3.0)
    alloc = allocate_bits(model, tokens, cfg, spec)
    cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + alloc.rules())

The allocation decides every linear the run would quantize; each layer keeps its own group size and
symmetry (from ``cfg``) and only its bit width is chosen. Fused groups (q/k/v, gate/up) share bits, and so
do the experts of one MoE layer (:mod:`signround.mixed.units`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from signround.config import LayerRule, MixedSpec, QuantConfig, QuantScheme, Sensitivity, Solver
from signround.errors import SignRoundError
from signround.mixed.allocate import solve_greedy, solve_ilp, total_size
from signround.mixed.budget import FLOAT_BITS, budget_bits, layer_bits
from signround.mixed.sensitivity import fisher_cost, fisher_diagonal, fused_groups, measure_blocks
from signround.mixed.units import ExpertUnits, expert_units, experts_modules, unit_label, whole_layer_pattern
from signround.model.blocks import find_blocks, resolve_schemes

SOLVERS = {Solver.ILP: solve_ilp, Solver.GREEDY: solve_greedy}


@dataclass
class Allocation:
    """The chosen bits of every layer group, with what led to them.

    ``groups[k]`` lists full layer names sharing choice ``choice[k]`` (an index into ``bit_options``);
    ``cost`` and ``size`` are ``[groups, options]``; ``budget`` and ``size`` are in bits. ``patterns[k]``, when
    not None, is one regex matching exactly ``groups[k]`` (a whole MoE layer's experts), used for its rule.
    """

    spec: MixedSpec
    groups: list[list[str]]
    schemes: list[dict[str, QuantScheme]]  # per group: layer -> base scheme (group size, sym)
    cost: np.ndarray
    size: np.ndarray
    choice: np.ndarray
    budget: int
    numel: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    patterns: list[str | None] = field(default_factory=list)

    def bits_of(self, k: int) -> int:
        return self.spec.bit_options[int(self.choice[k])]

    @property
    def avg_bits(self) -> float:
        """Achieved average bits per weight (overhead included) over the allocated layers."""
        return total_size(self.size, self.choice) / self.numel

    def layer_bits(self) -> dict[str, int]:
        return {name: self.bits_of(k) for k, names in enumerate(self.groups) for name in names}

    def rules(self) -> tuple[LayerRule, ...]:
        """One exact-name rule per layer (appended after the user's rules, so they win); one rule for a whole
        MoE layer's experts when they share one base scheme."""
        out = []
        for k, names in enumerate(self.groups):
            pattern = self.patterns[k] if k < len(self.patterns) else None
            if pattern is not None and len(set(self.schemes[k].values())) == 1:
                scheme = next(iter(self.schemes[k].values())).replace(bits=self.bits_of(k))
                out.append(LayerRule(pattern, scheme))
                continue
            for name in names:
                scheme = self.schemes[k][name].replace(bits=self.bits_of(k))
                out.append(LayerRule(f"^{re.escape(name)}$", scheme))
        return tuple(out)

    def to_config(self) -> dict[str, Any]:
        """What goes into ``quantization_config["mixed_precision"]``."""
        return {
            "bit_options": list(self.spec.bit_options),
            "target_avg_bits": self.budget / self.numel,
            "avg_bits": self.avg_bits,
            "solver": self.spec.solver.value,
            "sensitivity": self.spec.sensitivity.value,
            "sensitivity_nsamples": self.extra.get("nsamples", self.spec.nsamples),
            "layer_bits": self.layer_bits(),
            **({"expert_units": self.extra["expert_units"]} if "expert_units" in self.extra else {}),
        }

    def table(self) -> str:
        """Bits per group, one row per fused group, with the group's sensitivity at each option."""
        head = "  ".join(f"{'cost@' + str(b):>10}" for b in self.spec.bit_options)
        lines = [f"{'bits':>4}  {head}  layers"]
        for k, names in enumerate(self.groups):
            costs = "  ".join(f"{c:>10.3g}" for c in self.cost[k])
            lines.append(f"{self.bits_of(k):>4}  {costs}  {unit_label(names)}")
        lines.append(
            f"average {self.avg_bits:.4f} bits per weight (budget {self.budget / self.numel:.4f}, overhead included); "
            f"{self.spec.solver.value} on {self.spec.sensitivity.value} sensitivities measured in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def _layer_plan(model: nn.Module, cfg: QuantConfig, x0: torch.Tensor, kwargs: dict[str, Any], experts: ExpertUnits):
    """Per block: fused groups (relative names; MoE experts in their units) and each layer's base scheme;
    propagates ``x0`` through the float blocks (one sample) because the grouping hook needs real inputs."""
    prefix, blocks = find_blocks(model)
    block_groups, block_schemes = [], []
    x = x0
    for i, block in enumerate(blocks):
        schemes = resolve_schemes(f"{prefix}.{i}", block, cfg.scheme, cfg.layer_rules)
        groups = expert_units(block, fused_groups(block, x, kwargs, list(schemes)), experts)
        block_groups.append(groups)
        block_schemes.append(schemes)
        with torch.no_grad():
            out = block(x, **kwargs)
        x = out[0] if isinstance(out, (tuple, list)) else out
    return prefix, blocks, block_groups, block_schemes


def allocate_bits(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: QuantConfig,
    spec: MixedSpec,
    progress: bool = True,
    experts: ExpertUnits = ExpertUnits.LAYER,
) -> Allocation:
    """Measure, then solve. ``tokens [n, seqlen]`` int64 (the first ``spec.nsamples`` rows are used).

    ``experts``: the allocation units of a mixture of experts (:class:`~signround.mixed.units.ExpertUnits`):
    by default all experts of a layer share one width, as every serving engine stores them;
    ``ExpertUnits.EXPERT`` (per expert) gives checkpoints only the native format holds.

    Raises:
        SignRoundError: the budget is below the smallest possible size, or options are invalid.
    """
    from signround.calib.capture import capture_block_inputs

    t0 = time.perf_counter()
    tokens = tokens[: spec.nsamples]
    _, blocks = find_blocks(model)
    x0, kwargs = capture_block_inputs(model, blocks[0], tokens[:1])
    experts = ExpertUnits(experts)
    prefix, blocks, block_groups, block_schemes = _layer_plan(model, cfg, x0, kwargs, experts)
    n_experts = {f"{prefix}.{i}.{n}": e for i, b in enumerate(blocks) for n, e in experts_modules(b).items()}

    def options_of(schemes: dict[str, QuantScheme]) -> list[dict[str, QuantScheme]]:
        return [{n: s.replace(bits=b) for n, s in schemes.items()} for b in spec.bit_options]

    modules = dict(model.named_modules())
    groups, schemes, costs, sizes, patterns = [], [], [], [], []
    if spec.sensitivity in (Sensitivity.BLOCK, Sensitivity.BLOCK_MSE):
        opts = [options_of(s) for s in block_schemes]
        weighted = spec.sensitivity is Sensitivity.BLOCK
        per_block = measure_blocks(model, blocks, tokens, block_groups, opts, progress, weighted)
    else:
        layers = {f"{prefix}.{i}.{n}": modules[f"{prefix}.{i}.{n}"] for i, s in enumerate(block_schemes) for n in s}
        fisher = fisher_diagonal(model, tokens, layers)
        per_block = []
        for i, (gs, s) in enumerate(zip(block_groups, block_schemes, strict=True)):
            full_groups = [[f"{prefix}.{i}.{n}" for n in g] for g in gs]
            full_opts = [{f"{prefix}.{i}.{n}": sch for n, sch in o.items()} for o in options_of(s)]
            per_block.append(fisher_cost(layers, fisher, full_groups, full_opts))
    for i, (gs, s) in enumerate(zip(block_groups, block_schemes, strict=True)):
        for g_idx, g in enumerate(gs):
            full = [f"{prefix}.{i}.{n}" for n in g]
            groups.append(full)
            patterns.append(whole_layer_pattern(full, n_experts) if experts is ExpertUnits.LAYER else None)
            schemes.append(dict(zip(full, (s[n] for n in g), strict=True)))
            costs.append(per_block[i][g_idx])
            shapes = [(modules[f].out_features, modules[f].in_features) for f in full]
            sizes.append(
                [
                    sum(layer_bits(s[n].replace(bits=b), *shp) for n, shp in zip(g, shapes, strict=True))
                    for b in spec.bit_options
                ]
            )
    if not groups:
        raise SignRoundError("no layer is left to quantize; check --layer-config")
    cost, size = np.array(costs), np.array(sizes, dtype=np.int64)
    numel = sum(modules[n].weight.numel() for g in groups for n in g)
    decided = {id(modules[n].weight) for g in groups for n in g}
    fixed = sum(FLOAT_BITS * p.numel() for p in model.parameters() if id(p) not in decided)
    budget = budget_bits([numel], spec.avg_bits, spec.target_bytes, fixed)
    floor = int(size.min(axis=1).sum())
    if floor > budget:
        raise SignRoundError(
            f"a budget of {budget / numel:.3f} bits per weight is below the smallest possible "
            f"{floor / numel:.3f} (every layer at {spec.bit_options[0]} bits, scales and zeros included); "
            "raise --avg-bits/--target-size or add a lower --bit-options value"
        )
    choice = SOLVERS[spec.solver](cost, size, budget)
    seconds = time.perf_counter() - t0
    extra: dict[str, Any] = {"nsamples": int(tokens.shape[0])}
    if n_experts:
        extra["expert_units"] = experts.value
    return Allocation(spec, groups, schemes, cost, size, choice, budget, numel, seconds, extra, patterns)
