"""Writers of quantized checkpoints, in a registry keyed by format name.

An exporter is ``write(model, tokenizer, folder, **options) -> None`` writing into an empty, existing folder,
plus an optional ``check(model, planned, **options)`` that refuses, before any tuning, a layer plan the format
cannot store (``planned``: :class:`signround.export.common.Planned` per quantized layer). The caller
(:func:`save`) owns atomicity (temporary folder, rename at the end). Exporters read ``QuantLinear`` layers
only; they never import the tuning code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from signround.errors import SignRoundError
from signround.export.atomic import atomic_folder
from signround.export.common import Planned, planned_from_model
from signround.export.ct import check_ct, write_compressed_tensors
from signround.export.gguf_export import GGUF_TYPES, check_gguf_plan, write_gguf
from signround.export.gptq import check_gptq_layout, write_auto_round, write_gptq
from signround.export.native import write_native


class Exporter(NamedTuple):
    write: Callable[..., None]
    check: Callable[..., None] | None = None


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, write: Callable[..., None], check: Callable[..., None] | None = None) -> None:
    if name in _EXPORTERS:
        raise ValueError(f"exporter {name!r} is already registered")
    _EXPORTERS[name] = Exporter(write, check)


def exporter_names() -> list[str]:
    return sorted(_EXPORTERS)


def parse_formats(spec: str | list[str]) -> list[str]:
    """``"native,auto_round"`` -> ``["native", "auto_round"]``; unknown or repeated names are refused."""
    names = [f.strip() for f in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise SignRoundError(f"--format is empty; choose from {', '.join(exporter_names())}")
    for n in names:
        if n not in _EXPORTERS:
            raise SignRoundError(f"unknown format {n!r}; choose from {', '.join(exporter_names())}")
    if len(set(names)) != len(names):
        raise SignRoundError(f"--format lists a format twice: {','.join(names)}")
    return names


def check_formats(model: Any, planned: list[Planned], formats: list[str], **options: Any) -> None:
    """Run each format's check on the planned layers (before tuning, so a long run never fails at the end)."""
    for fmt in formats:
        check = _EXPORTERS[fmt].check
        if check is not None:
            check(model, planned, **options)


def refuse_activations(formats: list[str]) -> None:
    """Only the native format stores activation quantization (its scheme and static input scales)."""
    others = [f for f in formats if f != "native"]
    if others:
        raise SignRoundError(
            f"{', '.join(others)} cannot store quantized activations; use --format native for a model quantized "
            "with --act-bits"
        )


def subfolder(fmt: str) -> str:
    """Folder name of ``fmt`` when several formats are written: ``gguf:q4_k_m`` -> ``gguf-q4_k_m``."""
    return fmt.replace(":", "-")


def save(
    model: Any,
    tokenizer: Any,
    output: str | Path,
    fmt: str | list[str] = "native",
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output`` atomically, in one format or several.

    One format: ``output`` is that format's folder. Several (``"native,auto_round"`` or a list): ``output``
    holds one subfolder per format (``output/native``, ``output/auto_round``, ``output/gguf-q4_1``).
    ``options`` go to the exporters (e.g. ``allow_partial_groups=True`` for compressed-tensors).
    """
    formats = parse_formats(fmt)
    check_formats(model, planned_from_model(model), formats, **options)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, dict) and qc.get("activations") and formats != ["native"]:
        refuse_activations(formats)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        for f in formats:
            target = tmp if len(formats) == 1 else tmp / subfolder(f)
            target.mkdir(exist_ok=True)
            _EXPORTERS[f].write(model, tokenizer, target, **options)
    return Path(output)


register_exporter("native", write_native)
register_exporter("auto_round", write_auto_round, lambda m, p, **o: check_gptq_layout(m, p, "auto_round"))
register_exporter("gptq", write_gptq, lambda m, p, **o: check_gptq_layout(m, p, "gptq"))
register_exporter("compressed-tensors", write_compressed_tensors, check_ct)


def _register_gguf(qtype: str) -> None:
    register_exporter(
        f"gguf:{qtype}",
        lambda model, tokenizer, folder, **_: write_gguf(model, tokenizer, folder, qtype),
        lambda model, planned, **_: check_gguf_plan(model, planned, qtype),
    )


for _qtype in GGUF_TYPES:
    _register_gguf(_qtype)
