"""Every weight of the decoder blocks accounted for: what a run does with each parameter tensor.

A run quantizes the ``nn.Linear`` layers of each block that no rule keeps float (:func:`resolve_schemes`).
Every other tensor of a block must have a stated fate: 1-D tensors (norms, biases, attention sinks) and
mixture-of-experts routers stay float by default, and a rule (``--layer-config '{"pattern": null}'``) may
keep anything float. A weight matrix that is none of these (the fused 3-D expert tensors of transformers'
mixture-of-experts modules, a ``Conv1D``) cannot be quantized by the pipeline and is refused before any
work, never silently left float.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from torch import nn

from signround.config import LayerRule, QuantScheme
from signround.errors import SignRoundError
from signround.model.blocks import resolve_schemes


class Fate(str, enum.Enum):
    """What a run does with one parameter tensor of a decoder block."""

    QUANTIZED = "quantized"
    FLOAT_BY_RULE = "float by rule"
    FLOAT_BY_DEFAULT = "float by default"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class WeightFate:
    """One parameter tensor: full name, shape, fate, and why (the scheme's name, the rule's pattern, or the
    default's reason: ``norm/bias`` for 1-D tensors, ``router``)."""

    name: str
    shape: tuple[int, ...]
    fate: Fate
    why: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _is_router(module: nn.Module) -> bool:
    """A mixture-of-experts router: transformers' ``*Router`` modules (``mlp.gate`` of Qwen3-MoE, Mixtral,
    OLMoE, DeepSeek-V3; ``mlp.router`` of gpt-oss). A router that is a plain ``nn.Linear`` (older
    transformers) is a linear like any other: keep it float with a rule."""
    return type(module).__name__.endswith("Router")


def _float_rule(full: str, rules: tuple[LayerRule, ...]) -> str | None:
    """The pattern of the last rule matching ``full`` if it keeps it float, else None."""
    last = None
    for rule in rules:
        if re.search(rule.pattern, full):
            last = rule
    return last.pattern if last is not None and last.scheme is None else None


def account_block(
    prefix: str, block: nn.Module, base: QuantScheme, rules: tuple[LayerRule, ...] = ()
) -> list[WeightFate]:
    """The fate of every parameter tensor of ``block`` (named ``prefix.<name>``), in module order."""
    schemes = resolve_schemes(prefix, block, base, rules)
    modules = dict(block.named_modules())
    fates = []
    for name, p in block.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name] if owner_name else block
        full, shape = f"{prefix}.{name}", tuple(p.shape)
        if isinstance(owner, nn.Linear) and attr == "weight" and owner_name in schemes:
            fates.append(WeightFate(full, shape, Fate.QUANTIZED, schemes[owner_name].name))
        elif (pattern := _float_rule(f"{prefix}.{owner_name}" if owner_name else prefix, rules)) is not None:
            fates.append(WeightFate(full, shape, Fate.FLOAT_BY_RULE, pattern))
        elif p.dim() <= 1:
            fates.append(WeightFate(full, shape, Fate.FLOAT_BY_DEFAULT, "norm/bias"))
        elif _is_router(owner):
            fates.append(WeightFate(full, shape, Fate.FLOAT_BY_DEFAULT, "router"))
        elif isinstance(owner, nn.Linear) and attr == "weight":  # a linear no rule keeps float is quantized
            raise AssertionError(f"{full}: a linear missing from the resolved schemes")
        else:
            fates.append(WeightFate(full, shape, Fate.UNSUPPORTED, type(owner).__name__))
    return fates


@dataclass(frozen=True)
class WeightAccount:
    """The fate of every decoder-block weight tensor of a model (see :func:`account_model`)."""

    fates: tuple[WeightFate, ...]

    def of(self, fate: Fate) -> list[WeightFate]:
        return [f for f in self.fates if f.fate is fate]

    def summary(self) -> str:
        """``quantized N of M decoder weight tensors (P% of decoder parameters)`` and the float ones by reason."""
        quantized = self.of(Fate.QUANTIZED)
        total = sum(f.numel for f in self.fates) or 1
        share = 100.0 * sum(f.numel for f in quantized) / total
        kept = {}
        for f in self.fates:
            if f.fate is not Fate.QUANTIZED:
                key = f"{f.fate.value}: {f.why}"
                kept[key] = kept.get(key, 0) + 1
        rest = "; ".join(f"{k} x{v}" for k, v in kept.items())
        return (
            f"quantized {len(quantized)} of {len(self.fates)} decoder weight tensors ({share:.1f}% of decoder "
            f"parameters){'; kept float: ' + rest if rest else ''}"
        )

    def to_dict(self) -> dict[str, object]:
        """For the run report: every tensor's fate, and the summary."""
        return {
            "summary": self.summary(),
            "tensors": [
                {"name": f.name, "shape": list(f.shape), "fate": f.fate.value, "why": f.why} for f in self.fates
            ],
        }

    def refuse_unsupported(self) -> None:
        """Refuse, before any work, weight matrices the pipeline cannot quantize and no rule keeps float.

        Raises:
            SignRoundError: one line naming the first such tensor, how many there are, and what to do.
        """
        bad = self.of(Fate.UNSUPPORTED)
        if not bad:
            return
        first = bad[0]
        # the owner's name within its block: a regex that matches it in every block (its dots match themselves)
        pattern = re.sub(r"^.*?\.\d+\.", "", first.name.rpartition(".")[0])
        raise SignRoundError(
            f"{len(bad)} decoder weight tensor(s) cannot be quantized, e.g. {first.name} {list(first.shape)} "
            f"({first.why}: signround quantizes nn.Linear layers; fused mixture-of-experts weights are not supported "
            f"yet); keep them float explicitly with --layer-config '{{\"{pattern}\": null}}'"
        )


def account_model(prefix: str, blocks: nn.ModuleList, base: QuantScheme, rules: tuple[LayerRule, ...]) -> WeightAccount:
    """:func:`account_block` over every block ``prefix.i``."""
    return WeightAccount(tuple(f for i, b in enumerate(blocks) for f in account_block(f"{prefix}.{i}", b, base, rules)))
