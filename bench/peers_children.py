"""The children of bench/compare_peers.py (not a test): each quantization runs in its own process, started as
``<python> bench/peers_children.py <child> ...`` by the environment of its tool (signround's .venv, the
auto-round bench venv, the GPTQ venv), so this file imports nothing of signround or the bench at the top.
Each child's source is hashed into its rows' recipe (``*_RUNNER``): an edit here retires that tool's rows."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path


def vmhwm_gb() -> float:
    """Peak resident memory of this process (VmHWM), GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def grid_count(model, bits: int, group: int) -> dict:
    """How many decoder linears hold at most 2^bits distinct values in every group of ``group`` inputs (the
    last group may be shorter): a peer that left a layer float shows up here."""
    import torch

    on = total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "layers." not in name:
            continue
        total += 1
        w = mod.weight.detach().float()
        ok = bool(torch.isfinite(w).all())
        for s in range(0, w.shape[1], group):
            srt = w[:, s : s + group].sort(dim=1).values
            if int((1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)).max()) > 2**bits:
                ok = False
                break
        on += ok
    return {"linears_on_grid": on, "linears": total}


def signround_child(argv: list[str]) -> int:
    """``signround-child EXPECT_SHA SHA_OUT -- <signround CLI args>``: the real CLI, with the calibration
    ids it draws hashed on their way in (and the run stopped when they are not EXPECT_SHA; ``-``: none
    expected, as for RTN)."""
    expect, sha_out, sep, *cli = argv
    assert sep == "--"
    import hashlib as _h

    import torch

    import signround.pipeline
    import signround.plan
    from signround.cli import main

    original = signround.plan.resolve_tokens

    def checked(*a, **k):
        tokens = original(*a, **k)
        got = _h.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        Path(sha_out).write_text(json.dumps({"calib_sha256": got, "shape": list(tokens.shape)}))
        if got != expect:
            raise SystemExit(f"signround drew calibration tokens {got}, expected {expect}")
        return tokens

    signround.plan.resolve_tokens = checked
    signround.pipeline.resolve_tokens = checked
    return main(cli)


def _child_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for a in ("--model", "--tokens", "--output", "--report"):
        p.add_argument(a, required=True)
    for a in ("--bits", "--group-size", "--iters", "--nsamples", "--seqlen", "--batch-size", "--seed"):
        p.add_argument(a, type=int, required=True)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--alg-ext", action="store_true", help="auto-round: enable_alg_ext=True")
    p.add_argument("--opt-rtn", action="store_true", help="auto-round: iters 0 with its optimized RTN")
    return p.parse_args(argv)


def _samples(path: str):
    """The calibration ids as a list of ``{input_ids [1, L], attention_mask [1, L]}`` samples."""
    import torch
    from safetensors.torch import load_file

    tokens = load_file(path)["tokens"]
    return tokens, [
        {"input_ids": tokens[i : i + 1].clone(), "attention_mask": torch.ones_like(tokens[i : i + 1])}
        for i in range(tokens.shape[0])
    ]


def autoround_child(argv: list[str]) -> int:
    """In the bench venv: auto-round 0.16.1 on the given token ids; writes its fake-quantized model as a
    float HF folder and a JSON report (seconds, VmHWM, version, linears on the grid)."""
    args = _child_args(argv)
    os.chdir(Path(args.output).parent)  # auto-round writes ./ar_work_space, llm-compressor its logs: into --work
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dataset = _samples(args.tokens)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    amp = torch.cuda.is_available()  # auto-round's default on a GPU; float32 on the CPU, as signround there
    extra = {}
    if args.alg_ext:
        extra["enable_alg_ext"] = True
    if args.iters == 0:
        extra["disable_opt_rtn"] = not args.opt_rtn
    t0 = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dataset=dataset,
        amp=amp,
        **extra,
    )
    ar.quantize()
    seconds = time.perf_counter() - t0
    peak = vmhwm_gb()
    peak_gpu = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    model = model.to("cpu", torch.float32)
    grid = grid_count(model, args.bits, args.group_size)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    report = {
        "tool": "auto-round",
        "version": __import__("auto_round").__version__,
        "seconds": seconds,
        "peak_rss_gb": peak,
        "peak_gpu_gb": peak_gpu,
        "amp": amp,
        "torch_compile": bool(getattr(ar, "enable_torch_compile", None)),
        "kwargs": {"lr": args.lr, **extra},
        # which algorithm auto-round resolved the arguments to (SignRoundV2Config for enable_alg_ext, ...)
        "resolved": sorted(
            {
                type(x).__name__
                for v in vars(ar).values()
                for x in (v if isinstance(v, list | tuple) else [v])
                if type(x).__name__.endswith(("Config", "Quantizer"))
            }
        ),  # fmt: skip
        **grid,
    }
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"auto-round done in {seconds:.1f} s, peak RSS {peak:.2f} GB, {grid}")
    return 0


def gptq_modifier_kwargs(bits: int, group: int, sym: bool) -> dict:
    """GPTQModifier's arguments: the scheme, lm_head float, and the one non-default (see the docstring)."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": sym,
                    "strategy": "group",
                    "group_size": group,
                },
            }
        },
        "ignore": ["lm_head"],
        "bypass_divisibility_checks": True,
    }


def pad_last_group_in_observer(group: int) -> None:
    """llm-compressor 0.14.0.1's GPTQ quantizes a partial last group (its column loop maps column j to group
    j // group_size), but its weight observer reshapes the whole weight into groups and fails when the width
    is not a multiple (SmolLM2: 576 = 4.5 x 128). The observer gets the weight zero-padded to the next
    multiple: the min-max range already includes 0 and a zero quantizes to exactly 0, so the scales and zero
    points of the full groups are unchanged and the last group's come from its own 64 columns."""
    import torch
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.observers import helpers

    flatten = helpers._flatten_weight

    def padded(value, args):
        if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP) and value.shape[-1] % group:
            value = torch.nn.functional.pad(value, (0, group - value.shape[-1] % group))
        return flatten(value, args)

    helpers._flatten_weight = padded


def gptq_child(argv: list[str]) -> int:
    """In bench/.venv-gptq: llm-compressor's GPTQ oneshot on the given token ids; the GPTQ weights (its
    quantize-dequantized values) are copied into a fresh float model of the same folder, which is saved."""
    args = _child_args(argv)
    os.chdir(Path(args.output).parent)  # auto-round writes ./ar_work_space, llm-compressor its logs: into --work
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
    except Exception as exc:  # noqa: BLE001 - one line on why the tool is missing
        raise SystemExit(f"gptq: llm-compressor does not import here ({type(exc).__name__}: {exc})") from None

    pad_last_group_in_observer(args.group_size)
    _, samples = _samples(args.tokens)
    loader = torch.utils.data.DataLoader(
        [{k: v[0] for k, v in s.items()} for s in samples], batch_size=1, shuffle=False
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kwargs = gptq_modifier_kwargs(args.bits, args.group_size, args.sym)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=loader,
        recipe=GPTQModifier(**kwargs),
        num_calibration_samples=args.nsamples,
        max_seq_length=args.seqlen,
    )
    seconds = time.perf_counter() - t0
    peak = vmhwm_gb()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    copied = 0
    with torch.no_grad():
        for name, t in fresh.state_dict().items():
            if name not in state:
                raise SystemExit(f"gptq: the quantized model has no tensor {name}")
            if not torch.equal(t, state[name]):
                copied += 1
            t.copy_(state[name])
    grid = grid_count(fresh, args.bits, args.group_size)
    fresh.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    import importlib.metadata as md

    report = {
        "tool": "gptq",
        "version": md.version("llmcompressor"),
        "seconds": seconds,
        "peak_rss_gb": peak,
        "modifier": kwargs,
        "tensors_changed": copied,
        **grid,
    }
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"gptq done in {seconds:.1f} s, peak RSS {peak:.2f} GB, {grid}")
    return 0


def _src(*fns) -> str:
    return hashlib.sha256("".join(inspect.getsource(f) for f in fns).encode()).hexdigest()[:12]


# the children's code in the recipes, hashed once at import (edits to this file during a run change nothing)
GPTQ_RUNNER = _src(gptq_child, gptq_modifier_kwargs, pad_last_group_in_observer, grid_count, _samples)
AUTOROUND_RUNNER = _src(autoround_child, grid_count, _samples)
SIGNROUND_RUNNER = _src(signround_child)

CHILDREN = {"signround-child": signround_child, "autoround-child": autoround_child, "gptq-child": gptq_child}


if __name__ == "__main__":
    sys.exit(CHILDREN[sys.argv[1]](sys.argv[2:]))
