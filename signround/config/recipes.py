"""Named recipes, as auto-round users know them (``auto-round-light`` / ``auto-round`` / ``auto-round-best``):
``signround quantize --recipe fast|default|best`` or ``QuantConfig.from_recipe("fast", scheme="W4A16")``.

A recipe is a named set of the tuning budget's numbers: steps per block, calibration samples and their length,
batch size and step size. It fills only what the user left unset: an explicit ``--iters`` / ``--nsamples`` /
``--seqlen`` / ``--batch-size`` / ``--lr`` (or a ``tune`` / ``calib`` passed to ``from_recipe``) wins.

- ``fast``: 50 steps, signround's own step size 1/iters (auto-round light's step count; auto-round light
  instead fixes lr 5e-3).
- ``default``: what a run does with no recipe: 200 steps, 128 x 2048 tokens, batch 8 (auto-round's default
  numbers).
- ``best``: 1000 steps on 512 x 2048 tokens (auto-round best's numbers); about 5x default's time.

Where each lands in quality against time is measured by ``bench/frontier.py`` (its ``recipe`` column); the
recipes' numbers change only with that table's evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from signround.config.choices import Recipe
from signround.errors import SignRoundError


@dataclass(frozen=True)
class RecipeSpec:
    """One recipe's numbers: ``iters`` steps per block, ``nsamples`` calibration sequences of ``seqlen``
    tokens, ``batch_size`` sequences per step, ``lr`` the rounding step size (None: 1/iters)."""

    iters: int
    nsamples: int
    seqlen: int
    batch_size: int
    lr: float | None = None

    def tune_fields(self) -> dict[str, Any]:
        """The :class:`~signround.config.TuneConfig` fields this recipe sets."""
        return {"iters": self.iters, "batch_size": self.batch_size, "lr": self.lr}

    def calib_fields(self) -> dict[str, Any]:
        """The :class:`~signround.config.CalibConfig` fields this recipe sets."""
        return {"nsamples": self.nsamples, "seqlen": self.seqlen}


RECIPES: MappingProxyType[Recipe, RecipeSpec] = MappingProxyType(
    {
        Recipe.FAST: RecipeSpec(iters=50, nsamples=128, seqlen=2048, batch_size=8),
        Recipe.DEFAULT: RecipeSpec(iters=200, nsamples=128, seqlen=2048, batch_size=8),
        Recipe.BEST: RecipeSpec(iters=1000, nsamples=512, seqlen=2048, batch_size=8),
    }
)


def recipe_spec(recipe: Recipe | str | None) -> RecipeSpec:
    """The numbers of ``recipe`` (None: the default recipe); a one-line error for an unknown name."""
    if recipe is None:
        return RECIPES[Recipe.DEFAULT]
    try:
        return RECIPES[Recipe(recipe)]
    except ValueError:
        raise SignRoundError(f"unknown recipe {recipe!r}; choose one of {', '.join(r.value for r in Recipe)}") from None


def fill_from_recipe(recipe: Recipe | str | None, **given: Any) -> dict[str, Any]:
    """``given`` (the budget's fields a user set, None where unset: iters, nsamples, seqlen, batch_size, lr)
    with every None filled from ``recipe``. A field the recipe does not know is refused (a typo is not silently
    ignored)."""
    spec = recipe_spec(recipe)
    known = {**spec.tune_fields(), **spec.calib_fields()}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise SignRoundError(f"a recipe sets {', '.join(sorted(known))}; not {', '.join(unknown)}")
    return {name: known[name] if given.get(name) is None else given[name] for name in known}
