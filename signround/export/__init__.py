"""Writers of quantized checkpoints, one registered :class:`Exporter` per :class:`ExportFormat`.

An exporter (:mod:`signround.export.registry`) has ``write(model, tokenizer, folder, options)``, writing into
an empty, existing folder, and ``check(model, planned, options)``, refusing before any tuning a layer plan
the format cannot store (``planned``: a :class:`signround.model.blocks.Planned` per quantized layer).
:func:`save` owns atomicity (temporary folder, rename at the end). Exporters read ``QuantLinear`` layers
only; they never import the tuning code. Importing this package registers every exporter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signround.act.hadamard import online_layers
from signround.config import parse_formats as config_parse_formats
from signround.errors import SignRoundError

# importing each exporter module registers its exporters
from signround.export import ct, gguf_export, gptq, mxfp4_gptoss, native  # noqa: F401
from signround.export.atomic import atomic_folder
from signround.export.common import model_act, planned_from_model
from signround.export.registry import Exporter, ExportFormat, ExportOptions, get_exporter, register_exporter
from signround.model.blocks import Planned

FormatSpec = str | ExportFormat | Sequence[str | ExportFormat]

__all__ = [
    "ExportFormat",
    "ExportOptions",
    "Exporter",
    "check_formats",
    "get_exporter",
    "parse_formats",
    "refuse_activations",
    "register_exporter",
    "save",
]


def parse_formats(spec: FormatSpec) -> list[ExportFormat]:
    """``"native,auto_round"`` (or a list of names or formats) -> ``[ExportFormat.NATIVE,
    ExportFormat.AUTO_ROUND]``; unknown or repeated names are refused (:func:`signround.config.parse_formats`)."""
    return list(config_parse_formats(spec))


def check_formats(
    model: Any,
    planned: Sequence[Planned],
    formats: Sequence[ExportFormat],
    options: ExportOptions = ExportOptions(),  # noqa: B008 - frozen, so one shared default is safe
) -> None:
    """Run each format's check on the planned layers (before tuning, so a long run never fails at the end)."""
    for fmt in formats:
        get_exporter(fmt).check(model, planned, options)


def refuse_activations(formats: Sequence[ExportFormat]) -> None:
    """Refuse the formats that cannot store quantized activations (:attr:`ExportFormat.stores_activations`:
    the native format stores any scheme and its static input scales, compressed-tensors what its exporter's
    check accepts)."""
    others = [f for f in formats if not f.stores_activations]
    if others:
        raise SignRoundError(
            f"{', '.join(others)} cannot store quantized activations; use --format native or compressed-tensors "
            "for a model quantized with --act-bits"
        )


def save(
    model: Any,
    tokenizer: Any,
    output: str | Path,
    formats: FormatSpec = ExportFormat.NATIVE,
    *,
    overwrite: bool = False,
    options: ExportOptions = ExportOptions(),  # noqa: B008 - frozen, so one shared default is safe
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output`` atomically, in one format or several.

    One format: ``output`` is that format's folder. Several (``"native,auto_round"`` or a list): ``output``
    holds one subfolder per format (``output/native``, ``output/auto_round``, ``output/gguf-q4_1``:
    :attr:`ExportFormat.subfolder`). The formats' checks run first; nothing is written when one refuses.
    """
    fmts = parse_formats(formats)
    online = online_layers(model)
    others = [f.value for f in fmts if f is not ExportFormat.NATIVE]
    if online and others:
        raise SignRoundError(
            f"this model rotates the input of {len(online)} layers at run time (--rotate online), which "
            f"{', '.join(others)} readers do not apply; save it with --format native"
        )
    act = model_act(model)
    if act is not None:
        refuse_activations(fmts)
        options = dataclasses.replace(options, act=act)
    check_formats(model, planned_from_model(model), fmts, options)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        for f in fmts:
            target = tmp if len(fmts) == 1 else tmp / f.subfolder
            target.mkdir(exist_ok=True)
            get_exporter(f).write(model, tokenizer, target, options)
    return Path(output)
