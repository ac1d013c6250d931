"""Load a checkpoint with one reader and score it with signround's perplexity code (bench helper).

Readers: ``signround`` (our own loader), ``transformers`` (plain ``from_pretrained``: compressed-tensors
folders go through the compressed-tensors package), ``transformers-ct-dequantize`` (compressed-tensors with
``CompressedTensorsConfig(dequantize=True)``), ``gguf`` (transformers' GGUF loader on the folder's one
``.gguf`` file) and ``auto-round`` (transformers with ``AutoRoundConfig``: run it with the bench environment's
python, where auto-round is installed). Writes ``--json`` with the perplexity and ``--logits`` (float32
logits of the first ``--prompt-tokens`` tokens of the text) for a side-by-side check.

    python bench/reader_ppl.py --folder out/ct --reader transformers --max-windows 20 --json r.json --logits r.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def load(folder: Path, reader: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if reader == "signround":
        from signround.model.load import load_model

        return load_model(str(folder))
    if reader == "gguf":
        (name,) = [p.name for p in folder.glob("*.gguf")]
        kw = {"gguf_file": name}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw), AutoTokenizer.from_pretrained(
            folder, **kw
        )
    kwargs: dict = {"dtype": torch.float32}
    if reader == "transformers-ct-dequantize":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    elif reader == "auto-round":
        from transformers import AutoRoundConfig

        kwargs["quantization_config"] = AutoRoundConfig()
    elif reader != "transformers":
        raise SystemExit(f"unknown reader {reader}")
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--reader", required=True)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--json", required=True)
    p.add_argument("--logits", required=True)
    args = p.parse_args()

    from signround.eval.ppl import perplexity, resolve_text

    t0 = time.perf_counter()
    model, tokenizer = load(Path(args.folder), args.reader)
    model.eval()
    layer = model.model.layers[0].self_attn.q_proj
    ids = tokenizer(resolve_text("wikitext2").read_text(encoding="utf-8")[:4000], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids[:, : args.prompt_tokens]).logits.float()
    torch.save(logits, args.logits)
    ppl = perplexity(model, tokenizer, "wikitext2", args.seqlen, args.max_windows, progress=False)
    result = {
        "reader": args.reader,
        "folder": args.folder,
        "ppl": ppl.ppl,
        "windows": ppl.windows,
        "seqlen": ppl.seqlen,
        "layer_class": f"{type(layer).__module__}.{type(layer).__name__}",
        "seconds": time.perf_counter() - t0,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
