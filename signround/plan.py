"""The plan: everything decided before tuning.

    plan = make_plan(model, tokenizer, cfg, data)   # cfg: a QuantConfig
    report = pipeline.run(model, tokenizer, plan.config, plan.tokens or data, ...)

From the model and a validated :class:`~signround.config.QuantConfig` (which already refused the option
combinations that cannot go together), the plan decides each layer's scheme:

1. the user's rules (``cfg.layer_rules``) over the default scheme;
2. mixed precision (``cfg.mixed``): per-layer bits for a size budget, from measured sensitivities;
3. format search (``cfg.format_search``): per-layer grid of least activation-weighted error;
4. the layer mix a gguf K-quant export implies (``gguf:q4_k_m``'s upgraded layers, fallbacks for rows that
   are not a multiple of 256);

then runs every export format's check on the resulting layers, so a run the formats cannot store fails
before any tuning. Every decoder weight tensor is accounted for (:mod:`signround.model.accounting`): a
weight matrix the pipeline cannot quantize and no rule keeps float is refused first. The result is one
config whose ``layer_rules`` hold every decision, the calibration tokens the decisions were measured on (the
run reuses them), and what the checkpoint records about them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signround import export
from signround.calib.data import resolve_tokens
from signround.config import LayerRule, QuantConfig
from signround.export.gguf_kquant import format_rules
from signround.mixed import Allocation, allocate_bits
from signround.mixed.formats import FormatChoice, choose_formats
from signround.model.accounting import WeightAccount, account_model
from signround.model.blocks import Planned, find_blocks, resolve_schemes

log = logging.getLogger("signround")


@dataclass(frozen=True)
class Plan:
    """What was decided before tuning.

    Attributes:
        config: the run's config; its ``layer_rules`` are the user's, then the allocation's, the format
            search's and the export mix's (later rules win).
        tokens: ``[n, seqlen]`` int64 calibration tokens the plan measured on (None when it needed none).
        allocation: the mixed-precision allocation (None without ``cfg.mixed``).
        format_choice: the format search's choice (None without ``cfg.format_search``).
        export_rules: the rules the export formats' layer mix added.
        weights: the fate of every decoder weight tensor under ``config`` (quantized with which scheme, or
            kept float by which rule or default).
    """

    config: QuantConfig
    weights: WeightAccount
    tokens: torch.Tensor | None = None
    allocation: Allocation | None = None
    format_choice: FormatChoice | None = None
    export_rules: tuple[LayerRule, ...] = ()

    def records(self) -> dict[str, Any]:
        """What the checkpoint's ``quantization_config`` records about the plan (``mixed_precision``,
        ``format_search``)."""
        out: dict[str, Any] = {}
        if self.allocation is not None:
            out["mixed_precision"] = self.allocation.to_config()
        if self.format_choice is not None:
            out["format_search"] = self.format_choice.to_config()
        return out


def planned_layers(model: nn.Module, cfg: QuantConfig) -> list[Planned]:
    """Every linear that a run of ``cfg`` will quantize, with its scheme and shape (for exporters' checks)."""
    prefix, blocks = find_blocks(model)
    planned = []
    for i, block in enumerate(blocks):
        layers = dict(block.named_modules())
        for name, scheme in resolve_schemes(f"{prefix}.{i}", block, cfg.scheme, cfg.layer_rules).items():
            planned.append(Planned(f"{prefix}.{i}.{name}", scheme, layers[name].in_features, layers[name].out_features))
    return planned


def make_plan(model: nn.Module, tokenizer: Any, cfg: QuantConfig, data: Any = None, progress: bool = True) -> Plan:
    """Decide every layer's scheme and check the export formats can store them (see the module docstring).

    Args:
        model: the float model (whole in memory when ``cfg.mixed`` or ``cfg.format_search`` is set: both
            run the float model on the calibration tokens).
        tokenizer: its tokenizer (calibration text).
        cfg: the validated config.
        data: calibration tokens ``[n, seqlen]``, texts, or None for ``cfg.calib.dataset``
            (:func:`signround.calib.data.resolve_tokens`).
        progress: show the sensitivity pass's progress bar.

    Raises:
        SignRoundError: a budget below the smallest size, a layer an export format cannot store, ...
    """
    prefix, blocks = find_blocks(model)
    account_model(prefix, blocks, cfg.scheme, cfg.layer_rules).refuse_unsupported()  # before any work
    tokens = None
    if cfg.mixed is not None or cfg.format_search:  # both choose per-layer schemes from calibration data
        tokens = resolve_tokens(model, tokenizer, cfg.calib, data)
    allocation = choice = None
    if cfg.mixed is not None:
        allocation = allocate_bits(model, tokens, cfg, cfg.mixed, progress=progress, experts=cfg.mixed.experts)
        log.info("%s", allocation.table())
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + allocation.rules())
    if cfg.format_search:
        choice = choose_formats(model, tokens, cfg.format_search)
        log.info("format search: %s", ", ".join(f"{k} x{v}" for k, v in choice.counts().items()))
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + choice.rules())
    added: tuple[LayerRule, ...] = ()
    for fmt in cfg.export.formats:
        if not fmt.is_kquant:
            continue
        rules = format_rules(planned_layers(model, cfg), fmt.gguf_type, int(model.config.num_hidden_layers))
        if rules:  # the mix's per-layer types, then the fallbacks for rows llama.cpp cannot hold as K-quants
            log.info("%s: per-layer types and fallbacks: %s", fmt.value,
                     ", ".join(f"{r.pattern.rstrip('$')}: {r.scheme.name}" for r in rules))  # fmt: skip
            cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + rules)
            added += rules
    options = export.ExportOptions(allow_partial_groups=cfg.export.allow_partial_groups, act=cfg.act)
    export.check_formats(model, planned_layers(model, cfg), cfg.export.formats, options)
    weights = account_model(prefix, blocks, cfg.scheme, cfg.layer_rules)
    log.info("%s", weights.summary())
    return Plan(cfg, weights, tokens, allocation, choice, added)
