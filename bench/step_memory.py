"""Peak memory of tuning one decoder block (not a test): how much a SignRound step holds beyond the block.

Builds one LLaMA block with random weights (default: 1B-like shapes, hidden 2048, intermediate 5632), caches
float inputs and targets, and runs ``tune_block`` for a few steps. Prints the process's peak RSS (VmHWM)
before tuning and after, and on CUDA torch's allocator peak, so two versions of the code can be compared on
the same shapes (run it from each checkout):

    python bench/step_memory.py --hidden 2048 --intermediate 5632 --tokens 4x256 --iters 4 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from signround.config import QuantScheme, TuneConfig  # noqa: E402
from signround.model.blocks import resolve_schemes  # noqa: E402
from signround.pipeline import _run_block  # noqa: E402
from signround.report import peak_rss_gb  # noqa: E402
from signround.tune.signround import BlockData, tune_block  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--tokens", default="4x256", help="samples x seqlen (the batch is all samples)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the block's weights and inputs"
    )
    args = p.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    n, seqlen = (int(x) for x in args.tokens.split("x"))
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    block = LlamaDecoderLayer(cfg, 0).to(dev, dtype).eval()
    x = torch.randn(n, seqlen, args.hidden, device=dev, dtype=dtype)
    pos = torch.arange(seqlen, device=dev).unsqueeze(0)
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg).to(dev)(x, pos), "attention_mask": None}
    targets = _run_block(block, x, kwargs, n)
    schemes = resolve_schemes("model.layers.0", block, QuantScheme(bits=args.bits, group_size=128))
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    before = peak_rss_gb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    tune_block(block, BlockData(x, targets, kwargs), schemes, TuneConfig(iters=args.iters, batch_size=n), seed=0)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    result = {
        "block_weights": weights,
        "tokens": [n, seqlen],
        "dtype": args.dtype,
        "iters": args.iters,
        "rss_before_tuning_gb": before,
        "rss_peak_gb": peak,
        "tuning_added_bytes_per_weight": (peak - before) * 1e9 / weights,
        "seconds": seconds,
    }
    if dev.type == "cuda":
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
