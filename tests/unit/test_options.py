"""Option combinations: the command line and the Python API refuse the same things with the same message,
because both build one :class:`QuantConfig` and its construction validates the whole."""

from __future__ import annotations

import pytest

from signround import ActScheme, ExportConfig, MixedSpec, QuantConfig, QuantScheme, TuneConfig
from signround.cli import main
from signround.config import implied_scheme
from signround.errors import SignRoundError

MIXED = MixedSpec(avg_bits=3.0, bit_options=(2, 4))

# (CLI flags after `quantize --model M --output O`, the same config through the API)
REFUSED = {
    "smooth-without-act": (["--smooth"], lambda: QuantConfig(smooth=True)),
    "serve-bits-with-mixed": (
        ["--bits", "8", "--serve-bits", "4", "--avg-bits", "3", "--bit-options", "2,4"],
        lambda: QuantConfig(scheme=QuantScheme(bits=8), serve_bits=(4,), mixed=MIXED),
    ),
    "mixed-with-float-dtype": (
        ["--data-type", "fp4_e2m1", "--avg-bits", "3", "--bit-options", "2,4"],
        lambda: QuantConfig(scheme=QuantScheme(dtype="fp4_e2m1"), mixed=MIXED),
    ),
    "act-with-gptq": (
        ["--act-bits", "8", "--format", "gptq"],
        lambda: QuantConfig(act=ActScheme(bits=8), export=ExportConfig(formats="gptq")),
    ),
    "mixed-with-gguf": (
        ["--avg-bits", "3", "--bit-options", "2,4", "--format", "native,gguf:q4_0"],
        lambda: QuantConfig(mixed=MIXED, export=ExportConfig(formats="native,gguf:q4_0")),
    ),
    "format-search-with-mixed": (
        ["--format-search", "fp4_e2m1,fp4_e1m2", "--avg-bits", "3", "--bit-options", "2,4"],
        lambda: QuantConfig(format_search="fp4_e2m1,fp4_e1m2", mixed=MIXED),
    ),
    "format-search-with-serve-bits": (
        ["--bits", "8", "--serve-bits", "4", "--format-search", "int,fp8_e4m3"],
        lambda: QuantConfig(scheme=QuantScheme(bits=8), serve_bits="4", format_search="int,fp8_e4m3"),
    ),
    "format-search-one-candidate": (
        ["--format-search", "fp4_e2m1"],
        lambda: QuantConfig(format_search="fp4_e2m1"),
    ),
    "format-search-mixed-widths": (
        ["--format-search", "fp4_e2m1,fp8_e4m3"],
        lambda: QuantConfig(format_search=("fp4_e2m1", "fp8_e4m3")),
    ),
    "serve-bits-not-below-bits": (["--serve-bits", "4"], lambda: QuantConfig(serve_bits=(4,))),
    "serve-bits-on-a-float-grid": (
        ["--data-type", "fp8_e4m3", "--serve-bits", "4"],
        lambda: QuantConfig(scheme=QuantScheme(dtype="fp8_e4m3"), serve_bits=(4,)),
    ),
    "unknown-format": (["--format", "awq"], lambda: QuantConfig(export=ExportConfig(formats=("awq",)))),
    "format-twice": (["--format", "gptq,gptq"], lambda: QuantConfig(export=ExportConfig(formats="gptq,gptq"))),
    "bad-loss": (None, lambda: QuantConfig(tune=TuneConfig(loss="l1"))),
    "unknown-preset": (["--scheme", "W5A16"], lambda: QuantConfig(scheme="W5A16")),
    "unsupported-scheme": (["--scheme", "NVFP4"], lambda: QuantConfig(scheme="NVFP4")),
    "scheme-vs-format": (
        ["--scheme", "W8A16", "--format", "gguf:q4_0"],
        lambda: QuantConfig(
            scheme=implied_scheme("gguf:q4_0", bits=8, group_size=128, sym=True, labels={"bits": "--scheme W8A16"})
        ),
    ),
    "bad-layer-rule": (None, lambda: QuantConfig(layer_rules={"down_proj": 8})),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_cli_and_api_refuse_the_same_combination(case, tmp_path, capsys):
    flags, build = REFUSED[case]
    with pytest.raises(SignRoundError) as api:
        build()
    if flags is None:  # no flag spells it (the CLI's choices= refuse it first); the API must still refuse
        return
    argv = ["quantize", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"signround: error: {api.value}"]
    assert not (tmp_path / "out").exists()


def test_config_accepts_what_the_cli_spells_as_text():
    """A Python user writes the CLI's values (a preset, rules as a dict, formats and candidates as text)."""
    cfg = QuantConfig(
        scheme="W4A16",
        layer_rules={r"mlp\.down_proj": {"bits": 8}, "o_proj": None},
        format_search="int,fp4_e2m1",
        export=ExportConfig(formats="native,gptq"),
    )
    assert cfg.scheme == QuantScheme(bits=4, group_size=128, sym=True)
    assert [r.scheme.bits if r.scheme else None for r in cfg.layer_rules] == [8, None]
    assert [s.dtype.value for s in cfg.format_search] == ["int", "fp4_e2m1"]
    assert [f.value for f in cfg.export.formats] == ["native", "gptq"]
    assert QuantConfig(layer_rules=cfg.layer_rules).layer_rules == cfg.layer_rules  # parsed once, kept as is


def test_the_config_layer_knows_the_exporters_kquant_types():
    """``ExportFormat.is_kquant`` (config layer) lists the gguf K-quant types and mixes that the gguf exporter
    implements: the plan adds their per-layer types before tuning."""
    from signround.config import GGUF_KQUANTS, GGUF_MIXES, ExportFormat
    from signround.export.gguf_export import GGUF_TYPES
    from signround.export.gguf_kquant import KQUANTS, MIXES

    assert set(GGUF_KQUANTS) == set(KQUANTS) and set(GGUF_MIXES) == set(MIXES)
    assert {f.gguf_type for f in ExportFormat if f.is_gguf} == set(GGUF_TYPES)
    assert [f.value for f in ExportFormat if f.is_kquant] == [f"gguf:{t}" for t in (*GGUF_KQUANTS, *GGUF_MIXES)]
