"""signround vs its peers on identical calibration tokens, several seeds, one perplexity ruler (not a test).

Issue 27's comparison. Tools (``--tools``):

- ``float``: the model itself.
- ``rtn``: signround ``--method rtn`` (data-free, so one row per config; it equals auto-round's plain RTN).
- ``signround``: signround's defaults at the budget's iterations (light = 50, default = 200; its own
  step size, 1/iters).
- ``auto-round``: intel auto-round 0.16.1 with its defaults at the budget's iterations (lr 1/iters).
- ``auto-round-light``: auto-round's ``light`` recipe (iters 50, lr 5e-3; light budget only).
- ``auto-round-alg-ext``: auto-round with ``enable_alg_ext=True`` (its SignRoundV2 path) at each budget.
- ``auto-round-opt-rtn``: auto-round's optimized RTN (iters 0, opt-RTN on). auto-round 0.16.1 runs its
  imatrix-weighted search only for symmetric grids; for asymmetric ones it falls back to plain zero-shot RTN
  by its own rule (``_select_rtn_compressor_base_cls``), which the row's ``resolved`` field shows (RTNConfig).
- ``gptq``: llm-compressor 0.14.0.1's ``GPTQModifier`` through ``oneshot`` with its default options (block
  128, dampening 0.01, static act-order), the same bits / group / symmetry, lm_head float, in its own
  environment bench/.venv-gptq (bench/requirements-gptq.txt). One option is not its default:
  ``bypass_divisibility_checks=True``, because SmolLM2's 576-wide inputs are not a multiple of 128 (its
  last group has 64 columns, as auto-round and signround make it); without it llm-compressor refuses.

Calibration: for each seed one ``[nsamples, seqlen]`` tensor of token ids is drawn by signround's own
sampler (``common.calib_tokens``); signround's CLI draws it itself from ``--dataset --seed`` (a wrapper
hashes what it drew and stops the run if it differs), auto-round gets the ids as a list of
``{input_ids, attention_mask}`` samples, llm-compressor as a DataLoader of the same samples (batch 1,
its default). Every row records the seed and ``calib_sha256``.

Each quantization runs in its own process (peak RSS: VmHWM of that process; time: the tool's own span from
model-in-memory to quantized, calibration included; ``process_seconds`` is the whole child, load and save
included), then every model is scored by the same ``signround eval`` perplexity call. Within a seed the
tools run interleaved (their order rotates with the seed and config) so the machine's drift hits them alike.

A finished row is written to ``<results>/compare-peers/rows/<recipe_key>.json``: the key is a hash of the
row's full recipe (tool and version, the runner's source, signround's source hash for signround's rows, flags,
model, calibration hash, seed, evaluation windows and the source of signround/eval), so a rerun (on a fresh
checkout too) reuses only rows whose recipe matches and continues where the last run stopped. Any edit under
signround/ retires signround's and RTN's rows; the peers' rows survive it. The tables
``<results>/compare-peers.{md,json,png}`` are rebuilt from the rows after every row. Work files go to
bench/work/compare-peers/ (git-ignored).

    .venv/bin/python bench/compare_peers.py --configs 2:128:asym,3:128:sym,4:128:asym --seeds 42,43,44 \\
        --budgets light,default --default-seeds 42 --eval-windows 20
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_PY, DATA, ROOT, config_name, git_commit, machine, pyplot, recipe_key, sh, source_sha  # noqa: E402

NAME = "compare-peers"
GPTQ_PY = Path(
    shutil.which(os.environ.get("SIGNROUND_GPTQ_PY", "")) or ROOT / "bench" / ".venv-gptq" / "bin" / "python"
)
BUDGETS = {"light": 50, "default": 200}
TOOLS = (
    "float",
    "rtn",
    "signround",
    "auto-round",
    "auto-round-light",
    "auto-round-alg-ext",
    "auto-round-opt-rtn",
    "gptq",
)
TUNED = ("signround", "auto-round", "auto-round-alg-ext")  # one row per budget
LIGHT_ONLY = ("auto-round-light",)  # its recipe fixes the light budget
UNTUNED = ("rtn", "auto-round-opt-rtn", "gptq")  # budget "none"; they count against every budget
PEERS = ("auto-round", "auto-round-light", "auto-round-alg-ext", "auto-round-opt-rtn", "gptq", "rtn")
AUTOROUND_LIGHT_LR = 5e-3  # auto_round.cli.main.RECIPES["light"]


# ---------------------------------------------------------------- children (each in its own process)


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


# ---------------------------------------------------------------- recipes and versions


def venv_versions(py: Path, packages: tuple[str, ...]) -> dict | None:
    """{package: version} inside the environment of ``py``; None when it is missing or broken."""
    if not py.is_file():
        return None
    code = (
        "import json, importlib.metadata as m\nout = {}\n"
        f"for p in {packages!r}:\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def model_fingerprint(folder: str) -> str:
    """12 hex digits over the model folder's config.json and its weight files' names and sizes."""
    h = hashlib.sha256()
    base = Path(folder)
    if (base / "config.json").is_file():
        h.update((base / "config.json").read_bytes())
    for p in sorted(base.glob("*.safetensors")) + sorted(base.glob("*.bin")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


def rel(s: str) -> str:
    return s.replace(str(ROOT) + "/", "")


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work).resolve()  # the children run in it (their own scratch files stay there)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results = Path(args.results).resolve()
        self.rows_dir = self.results / NAME / "rows"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        from signround.model.load import resolve_model

        self.folder = resolve_model(args.model)
        if Path(self.folder).exists():
            self.folder = str(Path(self.folder).resolve())
        self.model_id = {"model": args.model, "fingerprint": model_fingerprint(self.folder)}
        self.commit = git_commit()
        self.signround_source = source_sha()  # at start: others edit the worktree live
        # the perplexity code is keyed; the checkpoint readers it loads through are not: the tests hold them to
        # the tools' own logits, and keying on signround/model or cli.py would throw away every peer's row (hours
        # of auto-round each) with any unrelated edit there
        self.eval_source = source_sha("signround/eval")
        self.versions = {
            "signround_venv": venv_versions(Path(sys.executable), ("signround", "torch", "transformers")),
            "bench_venv": venv_versions(BENCH_PY, ("auto-round", "torch", "transformers", "accelerate")),
            "gptq_venv": venv_versions(GPTQ_PY, ("llmcompressor", "compressed-tensors", "torch", "transformers")),
        }
        self.eval_flags = [
            "--ppl",
            args.ppl,
            "--seqlen",
            str(args.eval_seqlen),
            "--max-windows",
            str(args.eval_windows),
        ]
        self.eval_flags += ["--device", args.device] if args.device else []
        self.calib: dict[int, tuple[Path, str]] = {}
        self.failures: list[dict] = []

    # ------------------------------------------------------------ calibration tokens

    def tokens(self, seed: int) -> tuple[Path, str]:
        """The seed's token file and sha256 (drawn once, kept in the work folder)."""
        if seed not in self.calib:
            from safetensors.torch import load_file, save_file

            ds = Path(self.args.dataset)
            draw = {"dataset": ds.name, "size": ds.stat().st_size, "n": self.args.nsamples, "l": self.args.seqlen,
                    "seed": seed, "model": self.model_id, "sampler": source_sha("signround/calib/data.py")}  # fmt: skip
            path = self.work / f"calib-{self.args.nsamples}x{self.args.seqlen}-s{seed}-{recipe_key(draw)}.safetensors"
            if not path.is_file():
                from common import calib_tokens
                from transformers import AutoTokenizer

                tokens, _ = calib_tokens(
                    AutoTokenizer.from_pretrained(self.folder), str(ds), self.args.nsamples, self.args.seqlen, seed
                )
                save_file({"tokens": tokens}, str(path))
            t = load_file(str(path))["tokens"]
            if tuple(t.shape) != (self.args.nsamples, self.args.seqlen):
                raise SystemExit(f"{ds} gives only {tuple(t.shape)} calibration samples; lower --nsamples/--seqlen")
            self.calib[seed] = (path, hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())
        return self.calib[seed]

    # ------------------------------------------------------------ one row

    def recipe(self, tool: str, cfg: tuple[int, int, bool] | None, budget: str, seed: int | None) -> dict:
        a = self.args
        r = {"bench": NAME, "tool": tool, "model": self.model_id, "eval": {"flags": self.eval_flags,
             "source": self.eval_source}}  # fmt: skip
        if tool == "float":
            return r
        bits, group, sym = cfg
        iters = {"rtn": 0, "auto-round-opt-rtn": 0, "gptq": 0, "auto-round-light": BUDGETS["light"]}.get(tool)
        iters = BUDGETS[budget] if iters is None else iters
        r.update(bits=bits, group_size=group, sym=sym, iters=iters, seed=seed)
        if tool != "rtn":
            r.update(nsamples=a.nsamples, seqlen=a.seqlen, calib_sha256=self.tokens(seed)[1])
        if tool in ("rtn", "signround"):
            r.update(version=self.versions["signround_venv"], source=self.signround_source, runner=SIGNROUND_RUNNER,
                     batch_size=a.batch_size, device=a.device)  # fmt: skip
            if a.key_commit:
                r["commit"] = self.commit
        elif tool == "gptq":
            r.update(version=self.versions["gptq_venv"], runner=GPTQ_RUNNER,
                     modifier=gptq_modifier_kwargs(bits, group, sym))  # fmt: skip
        else:
            r.update(version=self.versions["bench_venv"], runner=AUTOROUND_RUNNER,
                     batch_size=a.batch_size, lr=AUTOROUND_LIGHT_LR if tool == "auto-round-light" else None,
                     alg_ext=tool == "auto-round-alg-ext", opt_rtn=tool == "auto-round-opt-rtn")  # fmt: skip
        return r

    @staticmethod
    def tag(tool: str, cfg, budget: str, seed: int | None, key: str) -> str:
        """A row's file names in --work (its model folder, with --keep-models, is ``<work>/<tag>``)."""
        return f"{tool}-{'float' if cfg is None else config_name(*cfg)}-{budget}-s{seed}-{key}"

    def run_row(self, tool: str, cfg, budget: str, seed: int | None) -> dict | None:
        recipe = self.recipe(tool, cfg, budget, seed)
        key = recipe_key(recipe)
        row_path = self.rows_dir / f"{key}.json"
        label = f"{'float' if cfg is None else config_name(*cfg)} {tool} {budget} seed {seed}"
        if row_path.is_file():
            row = json.loads(row_path.read_text())
            if row.get("recipe") == json.loads(json.dumps(recipe)):
                print(f"reuse {label}: {row_path.name}", flush=True)
                return row
        if self.args.cached:
            print(f"--cached: no row for {label}", flush=True)
            return None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"[{stamp}] {label} ({key})", flush=True)
        tag = self.tag(tool, cfg, budget, seed, key)
        out, rep_path = self.work / tag, self.work / f"{tag}-report.json"
        try:
            if tool == "float":
                model, rep, command, proc_s = self.folder, {}, None, None
            else:
                command, proc_s = self.quantize(tool, recipe, out, rep_path, tag)
                model, rep = str(out), json.loads(rep_path.read_text())
            ppl_path = self.work / f"{tag}-ppl.json"
            eval_cmd = [sys.executable, "-m", "signround.cli", "eval", "--model", model, "--json", str(ppl_path),
                        "--quiet", *self.eval_flags]  # fmt: skip
            sh(eval_cmd, self.work / f"{tag}-eval.log")
            ppl = json.loads(ppl_path.read_text())
        except (subprocess.CalledProcessError, SystemExit, OSError, ValueError) as exc:
            why = self.why(tag, exc)
            print(f"FAILED {label}: {why}", file=sys.stderr, flush=True)
            self.failures.append({"tool": tool, "config": None if cfg is None else config_name(*cfg),
                                  "budget": budget, "seed": seed, "why": why})  # fmt: skip
            return None
        finally:
            if not self.args.keep_models and tool != "float":
                shutil.rmtree(out, ignore_errors=True)
        row = {
            "config": "float" if cfg is None else config_name(*cfg),
            "budget": budget,
            "tool": tool,
            "seed": seed,
            "calib_sha256": recipe.get("calib_sha256"),
            "ppl": ppl["ppl"],
            "quant_seconds": rep.get("seconds"),
            "peak_rss_gb": rep.get("peak_rss_gb"),
            "iters": recipe.get("iters", 0),
            "nsamples": recipe.get("nsamples"),
            "seqlen": recipe.get("seqlen"),
            "eval_windows": ppl["windows"],
            "eval_seqlen": ppl["seqlen"],
            "process_seconds": proc_s,
            "peak_gpu_gb": rep.get("peak_gpu_gb"),
            "grid": {k: rep[k] for k in ("linears_on_grid", "linears") if k in rep} or None,
            "resolved": rep.get("resolved"),  # auto-round: the algorithm its arguments resolved to
            "recipe_key": key,
            "recipe": recipe,
            "command": None if command is None else rel(shlex.join(command)),
            "eval_command": rel(shlex.join(eval_cmd)),
            "commit": self.commit,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "started": stamp,
            "machine": machine(),
        }
        row_path.write_text(json.dumps(row, indent=1) + "\n")
        return row

    def quantize(self, tool: str, recipe: dict, out: Path, rep_path: Path, tag: str) -> tuple[list[str], float]:
        a = self.args
        bits, group, sym, seed = recipe["bits"], recipe["group_size"], recipe["sym"], recipe["seed"]
        log = self.work / f"{tag}-quant.log"
        if tool in ("signround", "rtn"):
            # signround at 0 iterations is its clipping search alone (a frontier point); rtn is data-free
            method = "rtn" if tool == "rtn" else "search" if recipe["iters"] == 0 else "signround"
            flags = ["--bits", str(bits), "--group-size", str(group), *(["--sym"] if sym else []),
                     "--method", method, "--iters", str(recipe["iters"]),
                     "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size),
                     "--seed", str(seed if seed is not None else 42), "--dataset", a.dataset,
                     *(["--device", a.device] if a.device else [])]  # fmt: skip
            expect = "-" if tool == "rtn" else self.tokens(seed)[1]
            cmd = [sys.executable, __file__, "signround-child", expect, str(self.work / f"{tag}-calib.json"), "--",
                   "quantize", "--model", a.model, *flags, "--output", str(out), "--overwrite", "--quiet",
                   "--report", str(rep_path)]  # fmt: skip
        else:
            py = GPTQ_PY if tool == "gptq" else BENCH_PY
            if not py.is_file():
                need = "bench/requirements-gptq.txt" if tool == "gptq" else "bench/requirements-bench.txt"
                raise SystemExit(f"{tool} needs the environment {rel(str(py))}; see {need}")
            child = "gptq-child" if tool == "gptq" else "autoround-child"
            cmd = [str(py), __file__, child, "--model", self.folder, "--tokens", str(self.tokens(seed)[0]),
                   "--bits", str(bits), "--group-size", str(group), "--iters", str(recipe["iters"]),
                   "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size),
                   "--seed", str(seed), "--output", str(out), "--report", str(rep_path)]  # fmt: skip
            cmd += ["--sym"] if sym else []
            cmd += ["--lr", str(recipe["lr"])] if recipe.get("lr") else []
            cmd += ["--alg-ext"] if recipe.get("alg_ext") else []
            cmd += ["--opt-rtn"] if recipe.get("opt_rtn") else []
        rep_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        sh(cmd, log)
        return cmd, time.perf_counter() - t0

    def why(self, tag: str, exc: BaseException) -> str:
        """One line on why a row failed: the last meaningful line of its logs, or the exception."""
        for name in (f"{tag}-eval.log", f"{tag}-quant.log"):
            log = self.work / name
            if log.is_file():
                lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
                if lines:
                    return lines[-1][:300]
        return f"{type(exc).__name__}: {exc}"[:300]

    # ------------------------------------------------------------ the matrix

    def schedule(self) -> list[tuple[str, tuple | None, str, int | None]]:
        """(tool, config, budget, seed) in run order: float first; then per budget, per seed, per config the
        tools of that budget in an order rotated by seed and config (the untuned tools in the first budget's
        pass; RTN once per config, it is data-free)."""
        a = self.args
        tools = [t for t in TOOLS if t in a.tools]
        configs = [(int(b), int(g), m == "sym") for b, g, m in (c.split(":") for c in a.configs.split(","))]
        out = [("float", None, "none", None)] if "float" in tools else []
        rtn_done = set()
        for bi, budget in enumerate(a.budgets):
            seeds = a.seeds if budget != "default" or not a.default_seeds else a.default_seeds
            for si, seed in enumerate(seeds):
                for ci, cfg in enumerate(configs):
                    here = [(t, budget) for t in tools if t in TUNED or (t in LIGHT_ONLY and budget == "light")]
                    if bi == 0:
                        here += [(t, "none") for t in tools if t in UNTUNED and t != "rtn"]
                        if "rtn" in tools and cfg not in rtn_done:
                            here.append(("rtn", "none"))
                            rtn_done.add(cfg)
                    k = (si + ci + bi) % len(here) if here else 0
                    for t, b in here[k:] + here[:k]:
                        out.append((t, cfg, b, None if t == "rtn" else seed))
        return out

    def run(self) -> None:
        plan = self.schedule()
        print(f"{len(plan)} rows planned", flush=True)
        rows = []
        for i, (tool, cfg, budget, seed) in enumerate(plan):
            row = self.run_row(tool, cfg, budget, seed)
            if row is not None:
                rows.append(row)
                if not self.args.cached:
                    write_tables(self, rows, done=i + 1, planned=len(plan))
        write_tables(self, rows, done=len(plan), planned=len(plan))
        print((self.results / f"{NAME}.md").read_text())
        if self.failures:
            print(f"{len(self.failures)} row(s) failed; see the table's failures section", file=sys.stderr)


# ---------------------------------------------------------------- tables


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["budget"], r["tool"]), []).append(r)
    out = []
    for (config, budget, tool), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], TOOLS.index(kv[0][2]))
    ):
        s = {
            "config": config,
            "budget": budget,
            "tool": tool,
            "seeds": sorted(r["seed"] for r in rs if r["seed"] is not None),
        }
        s["ppl"] = stats([r["ppl"] for r in rs])
        secs = [r["quant_seconds"] for r in rs if r["quant_seconds"] is not None]
        rss = [r["peak_rss_gb"] for r in rs if r["peak_rss_gb"] is not None]
        s["quant_seconds"] = stats(secs) if secs else None
        s["peak_rss_gb"] = stats(rss) if rss else None
        s["iters"] = rs[0]["iters"]
        out.append(s)
    return out


RULE = (
    "signround is called **better** than a peer at a config and budget only when signround's worst seed has a"
    " lower perplexity than the peer's best seed (the seed ranges do not overlap), with at least 2 seeds of"
    " signround and at least 2 of the peer (RTN is data-free: its one value stands for every seed); **worse**"
    " when the ranges do not overlap the other way; otherwise **not separated**. Fewer seeds: **not claimed**."
    " Paired: the seeds where signround beat the peer on the same calibration tokens (same seed, same"
    " calib_sha256), as a count."
)


def claims(rows: list[dict], summary: list[dict]) -> list[dict]:
    find = {(s["config"], s["budget"], s["tool"]): s for s in summary}
    out = []
    for s in summary:
        if s["tool"] != "signround":
            continue
        for peer in PEERS:
            p = find.get((s["config"], s["budget"], peer)) or find.get((s["config"], "none", peer))
            if p is None:
                continue
            ns, np_ = s["ppl"]["n"], p["ppl"]["n"]
            if ns < 2 or (np_ < 2 and peer != "rtn"):
                verdict = "not claimed"
            elif s["ppl"]["max"] < p["ppl"]["min"]:
                verdict = "better"
            elif s["ppl"]["min"] > p["ppl"]["max"]:
                verdict = "worse"
            else:
                verdict = "not separated"
            mine = {
                r["seed"]: r["ppl"]
                for r in rows
                if (r["config"], r["budget"], r["tool"]) == (s["config"], s["budget"], "signround")
            }
            theirs = {
                r["seed"]: r["ppl"]
                for r in rows
                if (r["config"], r["tool"]) == (s["config"], peer) and r["budget"] == p["budget"]
            }
            if peer == "rtn" and theirs:
                theirs = {seed: next(iter(theirs.values())) for seed in mine}
            common = sorted(set(mine) & set(theirs))
            out.append({"config": s["config"], "budget": s["budget"], "peer": peer, "peer_budget": p["budget"],
                        "verdict": verdict, "signround": s["ppl"], "peer_ppl": p["ppl"],
                        "paired_wins": sum(mine[k] < theirs[k] for k in common), "paired_n": len(common)})  # fmt: skip
    return out


def targets(summary: list[dict]) -> list[dict]:
    """Issue 27's targets per config and budget, as met / not met / n/a."""
    find = {(s["config"], s["budget"], s["tool"]): s for s in summary}
    fl = find.get(("float", "none", "float"))
    out = []
    for s in summary:
        if s["tool"] != "signround":
            continue
        c, b, mean = s["config"], s["budget"], s["ppl"]["mean"]
        peers = {t: find.get((c, b, t)) or find.get((c, "none", t)) for t in PEERS}
        peers = {t: p for t, p in peers.items() if p}
        losing = [t for t, p in peers.items() if p["ppl"]["mean"] <= mean]
        ar = find.get((c, b, "auto-round"))
        t = {"config": c, "budget": b, "seeds": s["ppl"]["n"],
             "mean_below_every_peer": None if not peers else not losing, "peers_not_beaten": losing,
             "worst_seed_within_autoround_mean": None if ar is None
             else s["ppl"]["max"] <= ar["ppl"]["mean"]}  # fmt: skip
        if c.startswith("W2") and ar and fl:
            ratio = (mean - fl["ppl"]["mean"]) / (ar["ppl"]["mean"] - fl["ppl"]["mean"])
            t["w2_excess_ratio"] = ratio
            t["w2_excess_ratio_at_most_0.75"] = ratio <= 0.75
        out.append(t)
    return out


def fmt_range(st: dict | None, f: str = ".3f") -> str:
    if not st:
        return ""
    if st["n"] == 1:
        return format(st["mean"], f)
    return f"{st['mean']:{f}} ({st['min']:{f}}-{st['max']:{f}})"


def write_tables(d: Driver, rows: list[dict], done: int, planned: int) -> None:
    a = d.args
    rows = sorted(rows, key=lambda r: (r["config"], r["budget"], TOOLS.index(r["tool"]), r["seed"] or 0))
    summary = summarize(rows)
    cl, tg = claims(rows, summary), targets(summary)
    # rows of one seed must share one calibration hash across tools
    hashes: dict = {}
    for r in rows:
        if r["calib_sha256"]:
            hashes.setdefault(r["seed"], set()).add(r["calib_sha256"])
    mixed = {s: sorted(h) for s, h in hashes.items() if len(h) > 1}
    meta = {
        "command": a.command,
        "machine": machine(),
        "commit": d.commit,
        "signround_source": d.signround_source,
        "versions": d.versions,
        "model": d.model_id,
        "dataset": Path(a.dataset).name,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "batch_size": a.batch_size,
        "budgets": {b: BUDGETS[b] for b in a.budgets},
        "eval": {"ppl": a.ppl, "seqlen": a.eval_seqlen, "windows": a.eval_windows},
        "rows_done": len(rows),
        "rows_planned": planned,
        "complete": done >= planned and not d.failures and len(rows) == planned,
        "claim_rule": RULE,
        "calib_hash_per_seed": {str(s): sorted(h) for s, h in hashes.items()},
    }
    d.results.mkdir(parents=True, exist_ok=True)
    keep = ("config", "budget", "tool", "seed", "calib_sha256", "ppl", "quant_seconds", "peak_rss_gb", "iters",
            "nsamples", "seqlen", "eval_windows", "eval_seqlen", "process_seconds", "peak_gpu_gb", "grid",
            "resolved", "recipe_key", "command", "started")  # fmt: skip
    blob = {**meta, "rows": [{k: r.get(k) for k in keep} for r in rows], "summary": summary, "claims": cl,
            "targets": tg, "failures": d.failures}  # fmt: skip
    (d.results / f"{NAME}.json").write_text(json.dumps(blob, indent=1) + "\n")
    (d.results / f"{NAME}.md").write_text(
        render(meta, rows, summary, cl, tg, d.failures, mixed, plot(d, summary, rows))
    )


_PLT: dict = {}


def plot(d: Driver, summary: list[dict], rows: list[dict]) -> str:
    """The png beside the tables; returns a line for the markdown."""
    if "plt" not in _PLT:
        _PLT["plt"] = pyplot()  # once: it says why there is no plot
    plt = _PLT["plt"]
    if plt is None:
        return "No plot: matplotlib is not installed in this environment (`pip install -e '.[bench]'`)."
    configs = sorted({s["config"] for s in summary if s["config"] != "float"})
    if not configs:
        return ""
    fl = next((s for s in summary if s["tool"] == "float"), None)
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for ax, c in zip(axes[0], configs, strict=True):
        ss = [s for s in summary if s["config"] == c]
        labels = [f"{s['tool']}\n{s['budget']}" for s in ss]
        for i, s in enumerate(ss):
            pts = [r["ppl"] for r in rows if (r["config"], r["budget"], r["tool"]) == (c, s["budget"], s["tool"])]
            color = "tab:blue" if s["tool"] == "signround" else "tab:orange" if "auto-round" in s["tool"] else "gray"
            ax.scatter([i] * len(pts), pts, color=color, s=14, zorder=3)
            ax.errorbar([i], [s["ppl"]["mean"]], yerr=[[s["ppl"]["mean"] - s["ppl"]["min"]],
                        [s["ppl"]["max"] - s["ppl"]["mean"]]], fmt="_", color="black", capsize=4)  # fmt: skip
        if fl:
            ax.axhline(fl["ppl"]["mean"], color="black", linewidth=0.8, linestyle=":", label="float")
        ax.set_xticks(range(len(ss)), labels, fontsize=6, rotation=60)
        ax.set_yscale("log")
        ax.set_title(f"{c}: ppl per seed, mean and min-max")
        ax.set_ylabel("wikitext-2 ppl")
    fig.tight_layout()
    fig.savefig(d.results / f"{NAME}.png", dpi=100)
    plt.close("all")
    return f"Plot: {NAME}.png (each seed a dot; the bar spans min-max, the tick is the mean)."


def render(meta, rows, summary, cl, tg, failures, mixed, plot_line) -> str:
    v = meta["versions"]
    ver = lambda d, k: (d or {}).get(k) or "missing"  # noqa: E731
    ev = meta["eval"]
    L = [
        "# signround vs peers on identical calibration tokens, several seeds (issue 27)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Commit {meta['commit'][:12]}, signround source {meta['signround_source']}. "
        f"signround {ver(v['signround_venv'], 'signround')} (torch {ver(v['signround_venv'], 'torch')}); "
        f"auto-round {ver(v['bench_venv'], 'auto-round')} (torch {ver(v['bench_venv'], 'torch')}, transformers "
        f"{ver(v['bench_venv'], 'transformers')}); llm-compressor {ver(v['gptq_venv'], 'llmcompressor')} "
        f"(compressed-tensors {ver(v['gptq_venv'], 'compressed-tensors')}, torch {ver(v['gptq_venv'], 'torch')}, "
        f"transformers {ver(v['gptq_venv'], 'transformers')}).",
        "",
        f"Model `{meta['model']['model']}`. Calibration: `{meta['dataset']}`, {meta['nsamples']} x {meta['seqlen']}"
        " token ids per seed drawn by signround's sampler, the same ids for every tool of that seed (hashes per seed"
        f" in the JSON); batch {meta['batch_size']}; budgets "
        + ", ".join(f"{b} = {n} iters" for b, n in meta["budgets"].items())
        + f". Perplexity: `signround eval`, {ev['ppl']}, first {ev['windows']} windows of {ev['seqlen']} tokens, the"
        " same call for every row. quant s: the tool's own span (model in memory to quantized, calibration"
        " included); peak RSS: VmHWM of the quantizing process. Rows done:"
        f" {meta['rows_done']} of {meta['rows_planned']}"
        + ("." if meta["complete"] else " (**partial**: the matrix has not finished, or rows failed)."),
        "",
        "## Summary (mean and min-max over seeds)",
        "",
        "| config | budget | tool | seeds | iters | ppl mean (min-max) | quant s mean (min-max) | peak RSS GB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        L.append(
            f"| {s['config']} | {s['budget']} | {s['tool']} | {','.join(map(str, s['seeds'])) or '-'} | {s['iters']} | "
            f"{fmt_range(s['ppl'])} | {fmt_range(s['quant_seconds'], '.0f')} | {fmt_range(s['peak_rss_gb'], '.2f')} |"
        )
    L += ["", plot_line, "", "## Claims", "", "Rule: " + RULE, ""]
    L += [
        "| config | budget | peer | verdict | signround ppl | peer ppl | paired wins |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for c in cl:
        peer = c["peer"] + ("" if c["peer_budget"] == c["budget"] else f" ({c['peer_budget']})")
        L.append(
            f"| {c['config']} | {c['budget']} | {peer} | {c['verdict']} | {fmt_range(c['signround'])} | "
            f"{fmt_range(c['peer_ppl'])} | {c['paired_wins']}/{c['paired_n']} |"
        )
    yn = lambda x: "n/a" if x is None else "met" if x else "**not met**"  # noqa: E731
    L += [
        "",
        "## Issue 27's targets",
        "",
        "Mean below every peer's mean (at that budget; GPTQ, RTN and optimized RTN at every budget); worst seed no"
        " worse than auto-round's mean; at W2 signround's mean excess over float at most 0.75x auto-round's.",
        "",
        "| config | budget | seeds | mean below every peer | worst seed <= auto-round mean | W2 excess ratio |",
        "|---|---|---:|---|---|---|",
    ]
    for t in tg:
        w2 = (
            ""
            if "w2_excess_ratio" not in t
            else f"{t['w2_excess_ratio']:.2f} ({yn(t['w2_excess_ratio_at_most_0.75'])})"
        )
        lost = f" (not below: {', '.join(t['peers_not_beaten'])})" if t["peers_not_beaten"] else ""
        L.append(f"| {t['config']} | {t['budget']} | {t['seeds']} | {yn(t['mean_below_every_peer'])}{lost} | "
                 f"{yn(t['worst_seed_within_autoround_mean'])} | {w2} |")  # fmt: skip
    L += ["", "## Rows", "", "| config | budget | tool | seed | calib_sha256 | ppl | quant s | process s | "
          "peak RSS GB | linears on grid | recipe key |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        g = r.get("grid") or {}
        L.append(
            f"| {r['config']} | {r['budget']} | {r['tool']} | {'' if r['seed'] is None else r['seed']} | "
            f"{(r['calib_sha256'] or '')[:12]} | {r['ppl']:.3f} | "
            f"{'' if r['quant_seconds'] is None else format(r['quant_seconds'], '.0f')} | "
            f"{'' if r['process_seconds'] is None else format(r['process_seconds'], '.0f')} | "
            f"{'' if r['peak_rss_gb'] is None else format(r['peak_rss_gb'], '.2f')} | "
            f"{'' if not g else str(g['linears_on_grid']) + '/' + str(g['linears'])} | {r['recipe_key']} |"
        )
    if mixed:
        L += ["", f"**Calibration hashes differ within a seed** (the comparison is not on equal tokens): {mixed}"]
    if failures:
        L += ["", "## Failed rows", ""] + [
            f"- {f['config']} {f['tool']} {f['budget']} seed {f['seed']}: {f['why']}" for f in failures
        ]
    L += ["", f"Each row's full recipe and its commands: `{NAME}/rows/<recipe key>.json`."]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """The options of the comparison (bench/peers_zeroshot.py adds its own to the same ones)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--configs", default="2:128:asym,3:128:sym,4:128:asym", help="bits:group:sym|asym, comma-separated")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--budgets", default="light,default", help="light (50 iters), default (200)")
    p.add_argument("--default-seeds", default=None, help="seeds of the default budget (default: --seeds)")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument(
        "--budget-iters", default="", help="override the budgets' iterations, e.g. light=1,default=2 (smoke)"
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--ppl", default="wikitext2")
    p.add_argument("--device", default=None, help="passed to signround (quantize and eval); auto-round picks its own")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / NAME))
    p.add_argument(
        "--results", default=str(ROOT / "bench" / "results"), help="tables here, rows in <results>/compare-peers/rows"
    )
    p.add_argument("--keep-models", action="store_true", help="keep each quantized model in --work after its eval")
    p.add_argument(
        "--key-commit", action="store_true", help="key signround rows on the commit too, not just its source hash"
    )
    p.add_argument("--cached", action="store_true", help="run nothing: tabulate the rows already in <results>")
    return p


def finish_args(args: argparse.Namespace, script: str = "compare_peers.py") -> argparse.Namespace:
    """Split the comma lists, apply --budget-iters, record the command; stops on an unknown tool or budget."""
    args.command = f"python bench/{script} " + shlex.join(sys.argv[1:])
    args.tools = args.tools.split(",")
    args.budgets = args.budgets.split(",")
    for item in filter(None, args.budget_iters.split(",")):  # smoke runs: light=1,default=2
        name, _, n = item.partition("=")
        BUDGETS[name] = int(n)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.default_seeds = [int(s) for s in args.default_seeds.split(",")] if args.default_seeds else None
    bad = (set(args.tools) - set(TOOLS)) | (set(args.budgets) - set(BUDGETS))
    if bad:
        raise SystemExit(f"unknown tool or budget {sorted(bad)}; tools {TOOLS}, budgets {sorted(BUDGETS)}")
    return args


@contextlib.contextmanager
def work_lock(work: str):
    """One driver per work folder (compare_peers and frontier share its rows and scratch files)."""
    Path(work).mkdir(parents=True, exist_ok=True)
    lock = Path(work) / "driver.lock"
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
        raise SystemExit(f"another driver (pid {pid}) is using {work}")
    except (OSError, ValueError):
        lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def main() -> None:
    args = finish_args(build_parser().parse_args())
    with work_lock(args.work):
        Driver(args).run()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        sys.exit(CHILDREN[sys.argv[1]](sys.argv[2:]))
    main()
