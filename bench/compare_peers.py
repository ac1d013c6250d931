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

Each quantization runs in its own process (bench/peers_children.py; peak RSS: VmHWM of that process; time:
the tool's own span from model-in-memory to quantized, calibration included; ``process_seconds`` is the whole
child, load and save included), then every model is scored by the same ``signround eval`` perplexity call.
Within a seed the tools run interleaved (their order rotates with the seed and config) so the machine's drift
hits them alike.

A finished row is written to ``<results>/compare-peers/rows/<recipe_key>.json``: the key is a hash of the
row's full recipe (tool and version, the runner's source, signround's source hash for signround's rows, flags,
model, calibration hash, seed, evaluation windows and the source of signround/eval), so a rerun (on a fresh
checkout too) reuses only rows whose recipe matches and continues where the last run stopped. Any edit under
signround/ retires signround's and RTN's rows; the peers' rows survive it. The tables
``<results>/compare-peers.{md,json,png}`` are rebuilt from the rows after every row (bench/peers_tables.py).
Work files go to bench/work/compare-peers/ (git-ignored).

    .venv/bin/python bench/compare_peers.py --configs 2:128:asym,3:128:sym,4:128:asym --seeds 42,43,44 \\
        --budgets light,default --default-seeds 42 --eval-windows 20
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_PY, DATA, ROOT, config_name, git_commit, machine, recipe_key, sh, source_sha  # noqa: E402
from peers_children import AUTOROUND_RUNNER, GPTQ_RUNNER, SIGNROUND_RUNNER, gptq_modifier_kwargs  # noqa: E402
from peers_tables import BUDGETS, LIGHT_ONLY, NAME, TOOLS, TUNED, UNTUNED, write_tables  # noqa: E402

CHILDREN_PY = Path(__file__).resolve().with_name("peers_children.py")
GPTQ_PY = Path(
    shutil.which(os.environ.get("SIGNROUND_GPTQ_PY", "")) or ROOT / "bench" / ".venv-gptq" / "bin" / "python"
)
AUTOROUND_LIGHT_LR = 5e-3  # auto_round.cli.main.RECIPES["light"]


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
            cmd = [sys.executable, str(CHILDREN_PY), "signround-child", expect, str(self.work / f"{tag}-calib.json"),
                   "--", "quantize", "--model", a.model, *flags, "--output", str(out), "--overwrite", "--quiet",
                   "--report", str(rep_path)]  # fmt: skip
        else:
            py = GPTQ_PY if tool == "gptq" else BENCH_PY
            if not py.is_file():
                need = "bench/requirements-gptq.txt" if tool == "gptq" else "bench/requirements-bench.txt"
                raise SystemExit(f"{tool} needs the environment {rel(str(py))}; see {need}")
            child = "gptq-child" if tool == "gptq" else "autoround-child"
            cmd = [str(py), str(CHILDREN_PY), child, "--model", self.folder, "--tokens", str(self.tokens(seed)[0]),
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
    main()
