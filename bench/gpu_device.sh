#!/usr/bin/env bash
# The GPU checks of issue 4 on a lent machine that reaches no network and keeps nothing between leases
# (see bench/results/NOTES.md). Everything it needs travels in two git-ignored folders that
# bench/gpu_prepare.sh builds beforehand:
#   .gpu/whl   wheels missing there (auto-round 0.16.1 and its needs, gguf), for Python 3.12
#   .gpu/data  calib-c4.jsonl and wikitext2-test.raw (copies of ../shared/data)
#   .gpu/tok   SmolLM2's tokenizer files (they size the 8B-shaped block's vocabulary)
#   .gpu/part1, .gpu2/part2   the SmolLM2-135M GGUF cut in two (a call carries at most 64 MiB)
# Stage a (first call): installs the wheels, keeps part1, times one LLaMA-8B-shaped block for both tools
# (with SMOL=1 also one SmolLM2-shaped block, where steps are launch-bound, adding signround --use-last).
# Stage b (the next call, on the same warm machine): joins the GGUF and runs compare_autoround on CUDA.
# Results go to $OUT (the folder the device tool brings back).
set -uo pipefail
export PYTHONUNBUFFERED=1
W=/tmp/gpu
export PYTHONPATH=$W/site:$PWD SIGNROUND_DATA=$W/data SIGNROUND_BENCH_PY=python3 SIGNROUND_CACHE=$W/cache
GGUF=$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
case "${1:-}" in
a)
    mkdir -p $W
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $W/site \
        .gpu/whl/*.whl || exit 1
    cp -r .gpu/data .gpu/tok $W/ && cp .gpu/part1 $W/part1 || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, auto_round as a; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'auto-round', a.__version__, 'cuda', torch.cuda.is_available())" || exit 1
    timeout "${BLOCK_TIMEOUT:-300}" python3 bench/gpu_block_timing.py --tokenizer $W/tok --work $W/blk \
        --results "$OUT" 2>&1 | tee "$OUT/block.log"
    if [ -n "${SMOL:-}" ]; then  # SMOL=1: also one SmolLM2-shaped block, with signround --use-last (about 3 min)
        timeout "${SMOL_TIMEOUT:-240}" python3 bench/gpu_block_timing.py --tokenizer $W/tok --work $W/blk \
            --shape smollm2 --tools signround,signround-last,auto-round --nsamples 128 --seqlen 512 \
            --iters 20,220 --name gpu-block-timing-smollm2 --results "$OUT" 2>&1 | tee "$OUT/block-smollm2.log"
    fi
    ;;
b)
    [ -f $W/part1 ] || { echo "no $W/part1: this is not stage a's machine (it went cold); rerun stage a"; exit 3; }
    mkdir -p $W/gguf && cat $W/part1 .gpu2/part2 > $GGUF && echo "$SHA  $GGUF" | sha256sum -c || exit 4
    python3 -c "from pathlib import Path; from signround.model.load import cache_dir, materialize_gguf
print('model ready in', materialize_gguf(Path('$GGUF'), cache_dir() / 'smollm2-135m'))" || exit 5
    python3 bench/compare_autoround.py --device cuda --budgets default --configs "${CONFIGS:-2:128,4:128,3:128}" \
        --modes asym,sym --nsamples 128 --seqlen 512 --batch-size 8 --skip-rtn --work $W/cmp \
        --results "$OUT" --name compare-autoround-gpu 2>&1 | tee "$OUT/compare.log"
    ;;
*)
    echo "usage: bench/gpu_device.sh a|b (on the lent GPU machine; see the header)"; exit 2
    ;;
esac
