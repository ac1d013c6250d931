"""Upcycle SmolLM2-135M-Instruct into a measurable mixture of experts (Mixtral layout), for bench/moe.py.

Every weight of SmolLM2 but the MLPs is carried over unchanged (embeddings, tied lm_head, attention, norms)
into transformers' ``MixtralForCausalLM``: LLaMA attention with an MoE MLP of ``--experts`` experts, top
``--top-k``. Each expert is a copy of its block's MLP plus a small seeded perturbation (``--noise`` times the
weight's standard deviation, elementwise Gaussian). Each router is set, during one forward pass of the
calibration tokens through the upcycled model (layer by layer, so every router sees the inputs the routers
before it produced), so that routing is uneven and one expert per layer is starved:

    router[e] = r_e / std(x . r_e) + offset_e * u / mean(x . u)

``x`` are the router's inputs (the normed hidden states of the calibration tokens), ``u`` the unit vector
of their mean (``x . u / mean(x . u)`` acts as a bias of about 1 on every token, since Mixtral's router has
none), ``r_e`` seeded Gaussian directions. The offsets of the other experts are ``--spread`` times seeded
Gaussians; the starved expert (a seeded pick per layer) gets the offset, found by bisection, at which
about ``--starved-share`` of the calibration tokens route to it.

The model is written as a safetensors folder with the tokenizer under ``--work`` (git-ignored), in a
folder keyed by the hash of its recipe (base weights' hash, settings, calibration data), so a rerun with the
same recipe reuses it. Prints float perplexities (signround's code) of SmolLM2 and of the upcycled model,
and the per-expert routing shares on the calibration tokens.

    .venv/bin/python bench/upcycle.py --work bench/work/moe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, signround_eval  # noqa: E402

BASE = "smollm2-135m"
RECIPE_VERSION = 1  # bump when the construction below changes


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def calib_tokens(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64: signround's own sampling of the calibration file (the tokens its CLI
    draws for ``--dataset --nsamples --seqlen --seed``); every tool in bench/moe.py gets these ids."""
    from signround.calib.data import load_texts, sample_tokens
    from signround.config import CalibConfig

    cfg = CalibConfig(dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed)
    return sample_tokens(load_texts(dataset), tokenizer, cfg)


def tokens_sha256(tokens: torch.Tensor) -> str:
    """sha256 of the token ids as contiguous little-endian int64 (shape not included)."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def recipe_of(args: argparse.Namespace, base_dir: Path) -> dict:
    return {
        "version": RECIPE_VERSION,
        "base": BASE,
        "base_sha256": file_sha256(base_dir / "model.safetensors"),
        "experts": args.experts,
        "top_k": args.top_k,
        "noise": args.noise,
        "spread": args.spread,
        "starved_share": args.starved_share,
        "seed": args.seed,
        "calib": {
            "dataset_sha256": file_sha256(Path(args.dataset)),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.calib_seed,
        },
    }


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def mixtral_config(llama, experts: int, top_k: int):
    from transformers import MixtralConfig

    c = llama.config
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        sliding_window=None,
        attention_dropout=0.0,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        dtype="float32",
    )


def carry_weights(llama, moe, noise: float, gen: torch.Generator) -> None:
    """Copy every non-MLP tensor exactly; each expert = the block's MLP + seeded noise; routers untouched."""
    src = llama.state_dict()
    dst = moe.state_dict()
    mlp = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")
    moe_only = (".mlp.gate.", ".mlp.experts.")
    carried = {k: v for k, v in src.items() if not any(m in k for m in mlp)}
    expected = {k for k in dst if not any(m in k for m in moe_only)}
    if set(carried) != expected:
        raise SystemExit(f"key mismatch: {sorted(set(carried) ^ expected)[:10]}")
    with torch.no_grad():
        for k in sorted(carried):
            if dst[k].shape != carried[k].shape:
                raise SystemExit(f"{k}: shape {tuple(carried[k].shape)} vs {tuple(dst[k].shape)}")
            dst[k].copy_(carried[k])
        for i, layer in enumerate(llama.model.layers):
            experts = moe.model.layers[i].mlp.experts
            w = {p: getattr(layer.mlp, p).weight for p in ("gate_proj", "up_proj", "down_proj")}

            def jitter(t: torch.Tensor) -> torch.Tensor:
                return t + noise * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)

            for e in range(experts.num_experts):
                experts.gate_up_proj[e].copy_(torch.cat([jitter(w["gate_proj"]), jitter(w["up_proj"])], dim=0))
                experts.down_proj[e].copy_(jitter(w["down_proj"]))
    if moe.config.tie_word_embeddings and moe.lm_head.weight.data_ptr() != moe.model.embed_tokens.weight.data_ptr():
        raise SystemExit("lm_head is not tied to the embeddings")


def top_k_share(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of tokens that pick each expert among their top k, ``[E]`` (sums to k)."""
    idx = logits.topk(k, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double() / logits.shape[0]


def set_routers(moe, tokens: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    """One forward pass; each router is set from its own inputs just before it runs (see the docstring)."""
    layers = moe.model.layers
    k = moe.config.num_experts_per_tok
    E = moe.config.num_local_experts
    notes: list[dict] = []

    def hook(i: int, router, args_) -> None:
        x = args_[0].detach().double()  # [T, H]
        mean = x.mean(0)
        u = mean / mean.norm()
        m = x @ u
        r = torch.randn(E, x.shape[1], generator=gen, dtype=torch.float64)
        z = x @ r.T
        base = r / z.std(0)[:, None]  # each expert's random feature, unit std over the tokens
        bias = u / m.mean()  # x . bias ~ 1 per token
        offsets = args.spread * torch.randn(E, generator=gen, dtype=torch.float64)
        starved = int(torch.randint(E, (1,), generator=gen))

        def share_at(off: float) -> tuple[float, torch.Tensor]:
            o = offsets.clone()
            o[starved] = off
            w = base + o[:, None] * bias
            return float(top_k_share(x @ w.T, k)[starved]), w

        lo, hi = -60.0, float(offsets.max())
        for _ in range(60):  # share grows with the offset (for the tokens with x . u > 0, nearly all)
            mid = (lo + hi) / 2
            s, _ = share_at(mid)
            lo, hi = (mid, hi) if s < args.starved_share else (lo, mid)
        offsets[starved] = lo
        s, w = share_at(lo)
        router.weight.data.copy_(w.to(router.weight.dtype))
        notes.append(
            {
                "layer": i,
                "starved_expert": starved,
                "starved_offset": lo,
                "starved_token_share": s,
                "bias_feature_cv": float(m.std() / m.mean()),
                "bias_feature_negative_tokens": int((m <= 0).sum()),
            }
        )

    handles = [
        layer.mlp.gate.register_forward_pre_hook(lambda mod, a, i=i: hook(i, mod, a)) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            moe(tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return notes


def routing_counts(model, tokens: torch.Tensor, batch: int = 8) -> list[list[int]]:
    """Per layer, how many calibration tokens each expert is routed (top-k choices) in a float forward."""
    E = model.config.num_local_experts
    counts = [torch.zeros(E, dtype=torch.long) for _ in model.model.layers]

    def hook(i: int, router, args_, out) -> None:
        idx = out[2]
        counts[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=E)

    handles = [
        layer.mlp.gate.register_forward_hook(lambda mod, a, o, i=i: hook(i, mod, a, o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch):
                model(tokens[s : s + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [c.tolist() for c in counts]


def build(args: argparse.Namespace) -> Path:
    """Build (or reuse) the upcycled model; returns its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    from signround.model.load import resolve_model

    base_dir = Path(resolve_model(BASE))
    recipe = recipe_of(args, base_dir)
    key = recipe_key(recipe)
    out = Path(args.work) / f"smollm2-moe{args.experts}x{args.top_k}-{key}"
    info_path = out / "upcycle.json"
    if info_path.is_file():
        print(f"reusing {out} (recipe {key})", flush=True)
        return out
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokens = calib_tokens(tokenizer, args.dataset, args.nsamples, args.seqlen, args.calib_seed)
    llama = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)  # the (overwritten) random init of the new model
    moe = MixtralForCausalLM(mixtral_config(llama, args.experts, args.top_k)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(args.seed)
    carry_weights(llama, moe, args.noise, gen)
    del llama
    notes = set_routers(moe, tokens, args, gen)
    counts = routing_counts(moe, tokens)
    tmp = out.with_name(out.name + ".tmp")
    moe.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "recipe": recipe,
        "key": key,
        "calib_sha256": tokens_sha256(tokens),
        "calib_shape": list(tokens.shape),
        "routers": notes,
        "routing_counts": counts,
        "command": "python bench/upcycle.py " + " ".join(sys.argv[1:]),
    }
    (tmp / "upcycle.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "moe"))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.01, help="expert perturbation, in units of the weight's std")
    p.add_argument("--spread", type=float, default=0.75, help="std of the routers' per-expert offsets")
    p.add_argument("--starved-share", type=float, default=0.004, help="tokens routed to the starved expert")
    p.add_argument("--seed", type=int, default=0, help="experts' noise, routers")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib-seed", type=int, default=42)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--no-eval", action="store_true", help="skip the float perplexities")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    folder = build(args)
    info = json.loads((folder / "upcycle.json").read_text())
    print(f"model: {folder}")
    print(f"calibration: {info['calib_shape'][0]} x {info['calib_shape'][1]} tokens, sha256 {info['calib_sha256']}")
    print("routing shares on the calibration tokens (% of tokens choosing each expert; sums to top-k x 100):")
    for i, c in enumerate(info["routing_counts"]):
        total = info["calib_shape"][0] * info["calib_shape"][1]
        shares = " ".join(f"{100 * n / total:5.1f}" for n in c)
        print(f"  layer {i:2d}: {shares}   least: expert {c.index(min(c))} with {min(c)} tokens")
    if not args.no_eval:
        flags = ["--ppl", "wikitext2", "--seqlen", str(args.eval_seqlen), "--max-windows", str(args.max_windows)]
        work = Path(args.work)
        base = signround_eval(BASE, work / f"float-{BASE}-ppl-{args.eval_seqlen}x{args.max_windows}.json", flags)
        moe = signround_eval(
            str(folder), folder.with_name(folder.name + f"-ppl-{args.eval_seqlen}x{args.max_windows}.json"), flags
        )
        print(f"float perplexity, wikitext-2, {base['windows']} windows x {base['seqlen']}: SmolLM2 {base['ppl']:.3f}, "
              f"upcycled MoE {moe['ppl']:.3f} ({100 * (moe['ppl'] / base['ppl'] - 1):+.2f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
