"""RTN vs signround vs intel auto-round 0.16.1 on a mixture of experts with real weights (not a test).

The model is SmolLM2-135M upcycled by bench/upcycle.py (Mixtral layout, 8 experts, top 2, one starved
expert per layer). Both tuning tools calibrate on the same token ids: one ``[nsamples, seqlen]`` tensor drawn
from the C4 sample by signround's own sampler with ``--seed`` (signround's CLI draws it itself from
``--dataset``; a wrapper checks that the ids it drew hash to the table's ``calib_sha256``; auto-round gets
the same ids as a list of ``{input_ids, attention_mask}`` samples, which 0.16.1 takes as ``dataset``).
Each quantization runs in its own process (peak memory: VmHWM of that process), then every model is scored
by the same ``signround eval`` call. For each output the script also counts the expert tensors that lie on
a quantization grid (at most 2^bits distinct values in every group of ``group_size`` inputs) and measures
each expert's output error against the float expert on the float model's own MLP inputs.

Finished runs are kept in ``--work`` (git-ignored), each keyed by a hash of its full recipe (tool, version,
source hash and commit, flags, model, calibration hash, seed); a rerun reuses only the runs that match.
Writes bench/results/moe.{md,json}.

    .venv/bin/python bench/moe.py --configs 3:128,4:128 --iters 50 --nsamples 32 --seqlen 256 --max-windows 10
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_PY, DATA, ROOT, machine, sh  # noqa: E402

SIGNROUND_PY = ROOT / ".venv" / "bin" / "python"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- hashing and versions


def sha12(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def source_hash() -> str:
    """Hash of signround's source as it is in the worktree now (other engineers edit it live)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "signround").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def versions() -> dict:
    code = (
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "('auto-round', 'torch', 'transformers', 'accelerate')}))"
    )
    bench = json.loads(subprocess.run([str(BENCH_PY), "-c", code], capture_output=True, text=True).stdout)
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('signround', 'torch', 'transformers')}))"  # noqa: E501
    ours = json.loads(subprocess.run([str(SIGNROUND_PY), "-c", code], capture_output=True, text=True).stdout)
    return {"bench_venv": bench, "signround_venv": ours}


# ---------------------------------------------------------------- child processes


def signround_child(argv: list[str]) -> int:
    """``moe.py signround-child EXPECT_SHA SHA_OUT -- <signround CLI args>``: the real CLI, with the
    calibration tokens it draws hashed (and checked against EXPECT_SHA) on their way into the plan."""
    expect, sha_out, sep, *cli = argv
    assert sep == "--"
    from upcycle import tokens_sha256

    import signround.pipeline
    import signround.plan
    from signround.cli import main

    original = signround.plan.resolve_tokens

    def checked(*a, **k):
        tokens = original(*a, **k)
        got = tokens_sha256(tokens)
        Path(sha_out).write_text(json.dumps({"calib_sha256": got, "shape": list(tokens.shape)}))
        if got != expect:
            raise SystemExit(f"signround drew calibration tokens {got}, expected {expect}")
        return tokens

    signround.plan.resolve_tokens = checked  # mixed precision / format search draw them in the plan,
    signround.pipeline.resolve_tokens = checked  # every other run in the pipeline
    return main(cli)


def autoround_child(argv: list[str]) -> int:
    """Runs in the bench venv: auto-round on the upcycled model with the given token ids; writes the
    fake-quantized model as a float folder and a JSON report (seconds, VmHWM, what it quantized)."""
    p = argparse.ArgumentParser()
    for a in ("--model", "--tokens", "--output", "--report"):
        p.add_argument(a, required=True)
    p.add_argument("--no-compile", action="store_true", help="enable_torch_compile=False")
    for a in ("--bits", "--group-size", "--iters", "--nsamples", "--seqlen", "--batch-size", "--seed"):
        p.add_argument(a, type=int, required=True)
    args = p.parse_args(argv)
    import torch
    from auto_round import AutoRound
    from autoround_run import peak_rss_gb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = load_file(args.tokens)["tokens"]
    dataset = [{"input_ids": tokens[i : i + 1].clone(), "attention_mask": torch.ones_like(tokens[i : i + 1])}
               for i in range(tokens.shape[0])]  # fmt: skip
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
                   dataset=dataset, amp=False, **({"enable_torch_compile": False} if args.no_compile else {}))  # fmt: skip # noqa: E501
    ar.quantize()
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    planned = {n: {k: c.get(k) for k in ("bits", "group_size", "sym")} for n, c in sorted(ar.layer_config.items())}
    state = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    # the per-expert weights auto-round left in its model, written back into a fresh float Mixtral
    fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    names, left_fused = [], []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".experts." in name:
                continue
            fresh.state_dict()[name].copy_(t)
        for i, layer in enumerate(fresh.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.num_experts):
                w = {pr: state.get(f"model.layers.{i}.mlp.experts.{e}.{pr}.weight") for pr in PROJECTIONS}
                fused = state.get(f"model.layers.{i}.mlp.experts.gate_up_proj")
                if all(v is None for v in w.values()) and fused is not None:  # auto-round left them fused
                    ex.gate_up_proj[e].copy_(fused[e])
                    ex.down_proj[e].copy_(state[f"model.layers.{i}.mlp.experts.down_proj"][e])
                    left_fused.append(f"model.layers.{i}.mlp.experts[{e}]")
                    continue
                if any(v is None for v in w.values()):
                    raise SystemExit(f"auto-round's model has no per-expert weights for layer {i} expert {e}: "
                                     f"{sorted(k for k in state if f'layers.{i}.' in k)[:6]}")  # fmt: skip
                ex.gate_up_proj[e].copy_(torch.cat([w["gate_proj"], w["up_proj"]], 0))
                ex.down_proj[e].copy_(w["down_proj"])
                names += [f"model.layers.{i}.mlp.experts.{e}.{pr}" for pr in PROJECTIONS]
    fresh.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    experts_planned = [n for n in names if (planned.get(n) or {}).get("bits", 16) < 16]
    report = {
        "tool": "auto-round",
        "version": __import__("auto_round").__version__,
        "seconds": seconds,
        "peak_rss_gb": peak,
        "torch_compile": bool(getattr(ar, "enable_torch_compile", None)),
        "expert_linears": len(names),
        "experts_left_fused": left_fused,
        "expert_linears_in_layer_config_below_16_bits": len(experts_planned),
        "layer_config_keys_sample": sorted(planned)[:8],
        "model_class_after": type(model.model.layers[0].mlp.experts).__name__,
    }
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"auto-round done in {seconds:.1f} s, peak RSS {peak:.2f} GB -> {args.output}")
    return 0


def expert_weights(folder: str):
    """{(layer, expert, projection): float32 weight} of a checkpoint folder (signround's loader: packed
    QuantLinear experts are dequantized; fused float experts are split)."""
    import torch

    from signround.model.experts import split_down, split_gate_up
    from signround.model.load import load_model
    from signround.pack.packed import QuantLinear

    model, _ = load_model(folder)
    out = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        if isinstance(ex, torch.nn.ModuleList):
            for e, mlp in enumerate(ex):
                for pr in PROJECTIONS:
                    lin = getattr(mlp, pr)
                    out[i, e, pr] = lin.dequantize() if isinstance(lin, QuantLinear) else lin.weight.detach().float()
        else:
            from signround.model.experts import ExpertLayout

            gate, up = split_gate_up(ex.gate_up_proj.detach(), ExpertLayout.OUTPUT_MAJOR)
            down = split_down(ex.down_proj.detach(), ExpertLayout.OUTPUT_MAJOR)
            for e in range(gate.shape[0]):
                out[i, e, "gate_proj"], out[i, e, "up_proj"], out[i, e, "down_proj"] = gate[e], up[e], down[e]
    return out


def on_grid(w, bits: int, group: int) -> bool:
    """Whether every group of ``group`` inputs (the last one padded: shorter) holds at most 2^bits values."""
    import torch

    for s in range(0, w.shape[1], group):
        g = w[:, s : s + group]
        srt = g.sort(dim=1).values
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
        if int(distinct.max()) > 2**bits:
            return False
    return bool(torch.isfinite(w).all())


def capture_child(argv: list[str]) -> int:
    """``capture-child FLOAT OUT NTOKENS``: each layer's MLP input in the float model on the first NTOKENS
    tokens of wikitext-2 (held out from calibration), for the per-expert output errors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround.eval.ppl import resolve_text

    folder, out, n = argv[0], argv[1], int(argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(resolve_text("wikitext2").read_text(encoding="utf-8")[: 20 * n], return_tensors="pt").input_ids[:, :n]
    xs = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(f"layer{i}", a[0][0].detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    save_file(xs, out)
    return 0


def experts_child(argv: list[str]) -> int:
    """``experts-child FLOAT QUANT INPUTS BITS GROUP OUT``: grid count and per-expert relative output error."""
    import torch
    from safetensors.torch import load_file

    fl, qu, inputs, bits, group, out = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    xs = load_file(inputs)
    wf, wq = expert_weights(fl), expert_weights(qu)
    layers = sorted({k[0] for k in wf})
    experts = sorted({k[1] for k in wf})
    on, changed, err = 0, 0, []
    act = torch.nn.functional.silu
    with torch.no_grad():
        for i in layers:
            x = xs[f"layer{i}"]
            row = []
            for e in experts:
                for pr in PROJECTIONS:
                    on += on_grid(wq[i, e, pr], bits, group)
                    changed += not torch.equal(wq[i, e, pr], wf[i, e, pr])

                yf, yq = (
                    (act(x @ w[i, e, "gate_proj"].T) * (x @ w[i, e, "up_proj"].T)) @ w[i, e, "down_proj"].T
                    for w in (wf, wq)
                )
                row.append(float((yq - yf).pow(2).sum() / yf.pow(2).sum()))
            err.append(row)
    total = len(layers) * len(experts) * len(PROJECTIONS)
    Path(out).write_text(json.dumps({"expert_tensors": total, "on_grid": on, "changed": changed, "rel_err": err}))
    return 0


# ---------------------------------------------------------------- the driver

RANK = {"rtn": 0, "default": 1, "auto-round": 2, "starved-block": 3, "starved-own": 4, "starved-init": 5}


def running_with(arg: str) -> bool:
    """Whether a live process other than this one has ``arg`` on its command line."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if arg in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                    return True
            except OSError:
                pass
    return False


def wait_for_other(work: Path, tag: str, rep_path: Path) -> bool:
    """Claim ``tag`` (a lock file with our pid) or, when a live moe.py holds it, wait for its report;
    True when another process produced the run."""
    lock = work / f"{tag}.lock"
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        lock.write_text(str(os.getpid()))
        return False
    if pid == os.getpid():
        return False
    print(f"{tag}: another moe.py (pid {pid}) is running it; waiting", flush=True)
    while lock.exists() and not rep_path.is_file():
        time.sleep(20)
    return rep_path.is_file()


def run_json(cmd: list[str], log: Path) -> None:
    sh(cmd, log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="3:128,4:128", help="bits:group pairs (asymmetric)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", default="42", help="tuning seeds, comma-separated (calibration ids use the first)")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--error-tokens", type=int, default=512, help="wikitext tokens for the per-expert errors")
    p.add_argument(
        "--starved", default="", help="--starved-experts values to add as signround rows, e.g. block,own,init"
    )
    p.add_argument("--starved-configs", default="3:128", help="configs that get the --starved rows")
    p.add_argument("--expert-min-tokens", type=int, default=None, help="passed with --starved rows when set")
    p.add_argument("--tools", default="rtn,signround,auto-round")
    p.add_argument("--jobs", type=int, default=1, help="quantizations at once (1: one tool after the other)")
    p.add_argument("--eval-jobs", type=int, default=1, help="evaluations at once, beside the quantizations")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "moe"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="moe")
    p.add_argument("--upcycle-args", default="", help="extra flags for bench/upcycle.py")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "python bench/moe.py " + shlex.join(sys.argv[1:])

    # the model (bench/upcycle.py, its own process; reused when the recipe matches)
    # the routers are set on upcycle.py's own calibration draw (its defaults), whatever the bench's nsamples
    up = [str(SIGNROUND_PY), str(ROOT / "bench" / "upcycle.py"), "--work", str(work), "--dataset", args.dataset,
          "--no-eval", *shlex.split(args.upcycle_args)]  # fmt: skip # noqa: E501
    done = subprocess.run(up, capture_output=True, text=True)
    print(done.stdout, flush=True)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit("bench/upcycle.py failed")
    folder = Path(next(line for line in done.stdout.splitlines() if line.startswith("model: ")).split(": ", 1)[1])
    info = json.loads((folder / "upcycle.json").read_text())
    ppl_suffix = f"-ppl-{args.eval_seqlen}x{args.max_windows}.json"
    floats: dict = {}

    # the token ids both tools calibrate on: signround's sampler on the file with the first seed
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    from upcycle import calib_tokens, file_sha256, tokens_sha256

    draw = {"dataset_sha256": file_sha256(Path(args.dataset)), "n": args.nsamples, "l": args.seqlen, "s": seeds[0]}
    tokens_file = work / f"calib-{sha12(draw)}.safetensors"
    if not tokens_file.is_file():
        t = calib_tokens(AutoTokenizer.from_pretrained(folder), args.dataset, args.nsamples, args.seqlen, seeds[0])
        save_file({"tokens": t}, str(tokens_file))
    calib_sha = tokens_sha256(load_file(str(tokens_file))["tokens"])

    vers = versions()
    commit = git("rev-parse", "HEAD")
    inputs = work / f"mlp-inputs-{info['key']}-{args.error_tokens}.safetensors"
    if not inputs.is_file():
        sh([str(SIGNROUND_PY), __file__, "capture-child", str(folder), str(inputs), str(args.error_tokens)])
    eval_flags = ["--ppl", "wikitext2", "--seqlen", str(args.eval_seqlen), "--max-windows", str(args.max_windows)]

    def evaluate(out: Path, tag: str, bits: int, group: int) -> tuple[dict, dict]:
        ppl_json = work / f"{tag}{ppl_suffix}"
        if not ppl_json.is_file():
            sh([str(SIGNROUND_PY), "-m", "signround.cli", "eval", "--model", str(out), "--json", str(ppl_json),
                "--quiet", *eval_flags])  # fmt: skip
        ex_json = work / f"{tag}-experts-{args.error_tokens}.json"
        if not ex_json.is_file():
            sh([str(SIGNROUND_PY), __file__, "experts-child", str(folder), str(out), str(inputs), str(bits),
                str(group), str(ex_json)])  # fmt: skip
        return json.loads(ppl_json.read_text()), json.loads(ex_json.read_text())

    rows: list[dict] = []
    up_tokens = info["calib_shape"][0] * info["calib_shape"][1]
    # starved: experts the float model routes under 1% of upcycle.py's calibration tokens (the one per layer
    # the router was built to starve, and any other that ended up as low)
    starved = [(i, e) for i, c in enumerate(info["routing_counts"]) for e, n in enumerate(c) if n < 0.01 * up_tokens]
    eval_pool = ThreadPoolExecutor(max_workers=args.eval_jobs)  # scoring runs beside the quantizations
    quant_pool = ThreadPoolExecutor(max_workers=args.jobs)
    pending, quants = [], []

    def float_ppl(name: str, model: str, path: Path) -> None:
        while not path.is_file() and running_with(str(path)):  # an earlier driver's eval still at it
            time.sleep(20)
        if not path.is_file():
            sh([str(SIGNROUND_PY), "-m", "signround.cli", "eval", "--model", model, "--json", str(path), "--quiet",
                *eval_flags])  # fmt: skip
        floats[name] = json.loads(path.read_text())

    pending.append(eval_pool.submit(float_ppl, "moe", str(folder), folder.with_name(folder.name + ppl_suffix)))
    pending.append(eval_pool.submit(float_ppl, "smollm2", "smollm2-135m", work / f"float-smollm2-135m{ppl_suffix}"))

    def add_row(row: dict, ppl: dict, ex: dict, rep: dict) -> None:
        err = ex["rel_err"]
        starved_err = [err[i][e] for i, e in starved]
        other_err = [x for i, r in enumerate(err) for e, x in enumerate(r) if (i, e) not in starved]
        row.update(
            ppl=ppl["ppl"],
            eval_windows=ppl["windows"],
            eval_seqlen=ppl["seqlen"],
            quant_seconds=rep.get("seconds"),
            peak_rss_gb=rep.get("peak_rss_gb"),
            expert_tensors=ex["expert_tensors"],
            expert_tensors_on_grid=ex["on_grid"],
            expert_tensors_changed=ex["changed"],
            starved_rel_err_mean=sum(starved_err) / len(starved_err),
            other_rel_err_mean=sum(other_err) / len(other_err),
            starved_rel_err=starved_err,
            expert_rel_err=err,
        )
        blocks = rep.get("blocks") or []
        if blocks and blocks[0].get("expert_tokens"):
            row["expert_tokens"] = [next(iter(b["expert_tokens"].values())) for b in blocks]
            row["starved_tokens"] = [row["expert_tokens"][i][e] for i, e in starved]
            row["min_expert_tokens"] = [min(c) for c in row["expert_tokens"]]
        for k in ("torch_compile", "expert_linears_in_layer_config_below_16_bits", "model_class_after"):
            if k in rep:
                row[k] = rep[k]
        # signround's own list of starved experts (routed fewer than --expert-min-tokens): tokens, what they
        # got, and for own / init their own output error at round-to-nearest and as quantized
        report_starved = [{"block": b["index"], **s} for b in blocks for s in b.get("starved") or []]
        if report_starved:
            row["report_starved"] = report_starved
            losses = [(s["rtn_loss"], s["loss"]) for s in report_starved if s.get("loss") is not None]
            if losses:
                row["report_starved_loss_over_rtn_mean"] = sum(q / r for r, q in losses) / len(losses)
        rows.append(row)
        rows.sort(key=lambda r: (r["config"], r["order"]))
        write(args, command, rows, info, floats, vers, commit, folder, calib_sha, starved)

    def signround_run(bits: int, group: int, method: str, seed: int, extra: list[str], variant: str) -> None:
        flags = ["--bits", str(bits), "--group-size", str(group), "--method", method, "--iters",
                 str(0 if method == "rtn" else args.iters), "--nsamples", str(args.nsamples), "--seqlen",
                 str(args.seqlen), "--batch-size", str(args.batch_size), "--seed", str(seed), "--dataset",
                 args.dataset, *extra]  # fmt: skip
        recipe = {"tool": "signround", "version": vers["signround_venv"], "source": source_hash(), "commit": commit,
                  "flags": flags, "model": info["key"], "calib_sha256": calib_sha, "seed": seed}  # fmt: skip
        tag = f"W{bits}G{group}-{variant}-s{seed}-{sha12({k: v for k, v in recipe.items() if k != 'commit'})}"
        out, rep_path = work / tag, work / f"{tag}.json"
        if not rep_path.is_file() and not wait_for_other(work, tag, rep_path):
            print(f"[{time.strftime('%H:%M:%S')}] {tag}: signround {' '.join(flags)}", flush=True)
            sha_out = work / f"{tag}-calib.json"
            cmd = [str(SIGNROUND_PY), __file__, "signround-child", calib_sha, str(sha_out), "--", "quantize",
                   "--model", str(folder), *flags, "--output", str(out), "--overwrite", "--quiet", "--report",
                   str(rep_path) + ".tmp"]  # fmt: skip
            try:
                sh(cmd, work / f"{tag}.log")
            finally:
                (work / f"{tag}.lock").unlink(missing_ok=True)
            Path(str(rep_path) + ".tmp").rename(rep_path)
            (work / f"{tag}-recipe.json").write_text(json.dumps(recipe, indent=2))
        rep = json.loads(rep_path.read_text())
        drawn = work / f"{tag}-calib.json"
        row = {"config": f"W{bits}G{group}-asym", "tool": "rtn" if method == "rtn" else "signround",
               "variant": variant, "seed": seed, "iters": 0 if method == "rtn" else args.iters, "tag": tag,
               "flags": flags, "source": recipe["source"], "commit": commit,
               "calib_sha256": json.loads(drawn.read_text())["calib_sha256"] if drawn.is_file() else None,
               "order": RANK.get(variant, 9)}  # fmt: skip
        pending.append(eval_pool.submit(lambda: add_row(row, *evaluate(out, tag, bits, group), rep)))

    def autoround_run(bits: int, group: int, seed: int) -> None:
        flags = ["--bits", str(bits), "--group-size", str(group), "--iters", str(args.iters), "--nsamples",
                 str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--seed",
                 str(seed), "--no-compile"]  # fmt: skip
        runner = hashlib.sha256(inspect.getsource(autoround_child).encode()).hexdigest()[:12]
        recipe = {"tool": "auto-round", "version": vers["bench_venv"], "runner": runner, "flags": flags,
                  "model": info["key"], "calib_sha256": calib_sha, "seed": seed}  # fmt: skip
        tag = f"W{bits}G{group}-autoround-s{seed}-{sha12(recipe)}"
        out, rep_path = work / tag, work / f"{tag}.json"
        if not rep_path.is_file() and not wait_for_other(work, tag, rep_path):
            print(f"[{time.strftime('%H:%M:%S')}] {tag}: auto-round {' '.join(flags)}", flush=True)
            cmd = [str(BENCH_PY), __file__, "autoround-child", "--model", str(folder), "--tokens", str(tokens_file),
                   *flags, "--output", str(out), "--report", str(rep_path) + ".tmp"]  # fmt: skip
            try:
                sh(cmd, work / f"{tag}.log")
            finally:
                (work / f"{tag}.lock").unlink(missing_ok=True)
            Path(str(rep_path) + ".tmp").rename(rep_path)
            (work / f"{tag}-recipe.json").write_text(json.dumps(recipe, indent=2))
        rep = json.loads(rep_path.read_text())
        row = {"config": f"W{bits}G{group}-asym", "tool": "auto-round", "variant": "default", "seed": seed,
               "iters": args.iters,
        "error_tokens": args.error_tokens, "tag": tag, "flags": flags, "calib_sha256": calib_sha, "order": RANK["auto-round"]}  # fmt: skip # noqa: E501
        pending.append(eval_pool.submit(lambda: add_row(row, *evaluate(out, tag, bits, group), rep)))

    tools = args.tools.split(",")
    for n, pair in enumerate(args.configs.split(",")):
        bits, group = (int(x) for x in pair.split(":"))
        for seed in seeds:
            # interleave: the tuning tools alternate which goes first from one config to the next
            order = ["signround", "auto-round"] if n % 2 == 0 else ["auto-round", "signround"]
            for tool in order:
                if tool not in tools:
                    continue
                if tool == "signround":
                    quants.append(quant_pool.submit(signround_run, bits, group, "signround", seed, [], "default"))
                else:
                    quants.append(quant_pool.submit(autoround_run, bits, group, seed))
            if "rtn" in tools and seed == seeds[0]:  # after the tuning tools: they start first with --jobs
                quants.append(quant_pool.submit(signround_run, bits, group, "rtn", seed, [], "rtn"))
    if args.starved:
        for pair in args.starved_configs.split(","):
            bits, group = (int(x) for x in pair.split(":"))
            for value in args.starved.split(","):
                extra = ["--starved-experts", value]
                if args.expert_min_tokens is not None:
                    extra += ["--expert-min-tokens", str(args.expert_min_tokens)]
                quants.append(
                    quant_pool.submit(signround_run, bits, group, "signround", seeds[0], extra, f"starved-{value}")
                )
    for f in quants:
        f.result()  # re-raises a failed quantization (after the others finished their own)
    for f in pending:
        f.result()  # re-raises a failed evaluation
    write(args, command, rows, info, floats, vers, commit, folder, calib_sha, starved)
    print((Path(args.results) / f"{args.name}.md").read_text())


# ---------------------------------------------------------------- results


def write(args, command, rows, info, floats, vers, commit, folder, calib_sha, starved) -> None:
    if "moe" not in floats or "smollm2" not in floats:
        return  # the float rows come first in the eval queue; nothing to tabulate before them
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "machine": machine(),
        "commit": commit,
        "versions": vers,
        "model": {
            "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "recipe": info["recipe"],
            "key": info["key"],
            "routers": info["routers"],
            "routing_counts_float": info["routing_counts"],
        },  # fmt: skip
        "calib_sha256": calib_sha,
        "calib_shape": [args.nsamples, args.seqlen],
        "upcycle_calib_sha256": info["calib_sha256"],
        "upcycle_calib_shape": info["calib_shape"],
        "starved_experts": starved,
        "iters": args.iters,
        "error_tokens": args.error_tokens,
        "batch_size": args.batch_size,
        "float": dict(floats),
    }
    (results / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    fb, fm = meta["float"]["smollm2"], meta["float"]["moe"]
    v = meta["versions"]
    L = [
        "# Mixture of experts: RTN vs signround vs auto-round 0.16.1 (SmolLM2-135M upcycled, Mixtral layout)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Commit {meta['commit'][:10]}; signround {v['signround_venv']['signround']} "
        f"(torch {v['signround_venv']['torch']}, transformers {v['signround_venv']['transformers']}); auto-round "
        f"{v['bench_venv']['auto-round']} (torch {v['bench_venv']['torch']}, transformers "
        f"{v['bench_venv']['transformers']}).",
        "",
        f"Model `{meta['model']['folder']}` (recipe {meta['model']['key']}, bench/upcycle.py). Calibration: "
        f"{meta['calib_shape'][0]} x {meta['calib_shape'][1]} token ids, calib_sha256 `{meta['calib_sha256']}`, "
        f"the same ids for both tuning tools; {meta['iters']} iterations, batch {meta['batch_size']}. "
        "Perplexity: signround's code, wikitext-2 test, "
        f"{fm['windows']} windows x {fm['seqlen']}. Float: SmolLM2 {fb['ppl']:.3f}, upcycled MoE {fm['ppl']:.3f}.",
        "",
        "| config | tool | seed | ppl | quant s | time ratio | peak RSS GB | expert tensors on grid / changed / all "
        "| starved experts' rel. output err | other experts' | starved tokens (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        ar = next((x for x in rows if x["config"] == r["config"] and x["tool"] == "auto-round"
                   and x["seed"] == r["seed"]), None)  # fmt: skip
        ratio = (
            f"{r['quant_seconds'] / ar['quant_seconds']:.2f}"
            if ar and r["tool"] != "rtn" and r.get("quant_seconds")
            else ""
        )
        st = r.get("starved_tokens")
        label = r["tool"] + ("" if r["variant"] in ("default", "rtn") else f" `--starved-experts {r['variant'][8:]}`")
        L.append(
            f"| {r['config']} | {label} | {r['seed']} | {r['ppl']:.3f} | {r['quant_seconds']:.0f} | {ratio} | "
            f"{r['peak_rss_gb']:.2f} | {r['expert_tensors_on_grid']} / {r['expert_tensors_changed']} / "
            f"{r['expert_tensors']} | {r['starved_rel_err_mean']:.4f} | {r['other_rel_err_mean']:.4f} | "
            f"{'' if not st else f'{min(st)}-{max(st)}'} |"
        )
    L += [
        "",
        "Time ratio: the row's quantization seconds over auto-round's in the same config and seed. With --jobs > 1"
        " the quantizations ran at the same time (see the start times in the JSON rows and the driver log), on a"
        " shared, oversubscribed machine: the seconds are wall time under load, not ratios to quote."
        " Peak RSS: VmHWM of each tool's own process. Expert tensors on grid: expert weights whose"
        " every group holds at most 2^bits distinct values (quantized); changed: differ from the float expert."
        " Relative output error: ||E_q(x) - E(x)||^2 / ||E(x)||^2 of each expert on the float model's MLP inputs"
        f" of {meta['error_tokens']} held-out wikitext tokens (all of them, whatever the router picks), averaged"
        f" over the {len(meta['starved_experts'])} starved experts (those the float model routes under 1% of"
        " upcycle.py's calibration tokens) and over all the others. Starved tokens: the bench's calibration"
        " tokens the float model routed to the starved experts, from signround's run report"
        " (blocks[].expert_tokens).",
        "",
        f"Routing of the float model on upcycle.py's calibration draw ({meta['upcycle_calib_shape'][0]} x"
        f" {meta['upcycle_calib_shape'][1]} tokens; % of tokens choosing each expert, top-2, so a row sums to 200):",
        "",
        "| layer | "
        + " | ".join(f"e{e}" for e in range(len(meta["model"]["routing_counts_float"][0])))
        + " | starved |",
        "|---:|" + "---:|" * (len(meta["model"]["routing_counts_float"][0]) + 1),
    ]
    total = meta["upcycle_calib_shape"][0] * meta["upcycle_calib_shape"][1]
    for i, c in enumerate(meta["model"]["routing_counts_float"]):
        s = meta["model"]["routers"][i]["starved_expert"]
        L.append(f"| {i} | " + " | ".join(f"{100 * n / total:.2f}" for n in c) + f" | e{s} ({c[s]} tokens) |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].endswith("-child"):
        child = {"signround-child": signround_child, "autoround-child": autoround_child,
                 "capture-child": capture_child, "experts-child": experts_child}[sys.argv[1]]  # fmt: skip
        sys.exit(child(sys.argv[2:]))
    main()
