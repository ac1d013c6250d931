"""Activation quantization: the quantizers of a linear layer's input and the hooks that apply them
(:mod:`signround.act.quant`), static scales from calibration data (:mod:`signround.act.calibrate`),
smoothing (:mod:`signround.act.smooth`) and the bit-plane integer product (:mod:`signround.act.bitplane`).

This init imports nothing: ``signround.pack`` imports ``signround.act.quant``, which runs this file first,
and the other modules here sit above the tuning code (tests/unit/test_layers.py).
"""
