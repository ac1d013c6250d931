#!/usr/bin/env bash
# The GPU checks (issues 27 and 28) on a lent machine that reaches no network and keeps nothing between leases
# (see bench/results/NOTES.md). Everything it needs travels in two git-ignored folders that
# bench/gpu_prepare.sh builds beforehand (a call carries at most 64 MiB, the working tree included):
#   .gpu/whl   wheels missing there (auto-round 0.16.1 and its needs, gguf), for Python 3.12
#   .gpu/data  calib-c4.jsonl and wikitext2-test.raw (copies of ../shared/data)
#   .gpu/part1, .gpu2/part2   the SmolLM2-135M GGUF cut in two
#   .gpu2/whl-gptq   llm-compressor 0.14.0.1 and what it pins (transformers 5.17, auto-round 0.15.1)
# Stage a (first call, carry .gpu): installs the wheels and keeps part1 (about a minute).
# Stage b (the next call, carry .gpu2, on the same warm machine): joins the GGUF and runs compare_peers on CUDA
# (every tool on the same 128 x 2048 tokens, auto-round's full default; the default budget; CONFIGS / SEEDS /
# BUDGETS / WINDOWS / PEERS_TIMEOUT override). Call `b` again (no carry needed) while the machine is warm to go
# on where it stopped: the rows it finished come back in $OUT/gpu; copy them to bench/results/gpu and commit.
# Stage c (optional, same machine): times one LLaMA-8B-shaped block for both tools (tokenizer from the joined
# model; with SMOL=1 also one SmolLM2-shaped block, where steps are launch-bound, adding signround --use-last).
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
    cp -r .gpu/data $W/ && cp .gpu/part1 $W/part1 || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, auto_round as a; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'auto-round', a.__version__, 'cuda', torch.cuda.is_available())" || exit 1
    ;;
b)
    [ -f $W/part1 ] || { echo "no $W/part1: this is not stage a's machine (it went cold); rerun stage a"; exit 3; }
    if [ ! -f $W/model.ok ]; then  # the first b call: join the model, install GPTQ's site
        mkdir -p $W/gguf && cat $W/part1 .gpu2/part2 > $GGUF && echo "$SHA  $GGUF" | sha256sum -c || exit 4
        python3 -c "from pathlib import Path; from signround.model.load import cache_dir, materialize_gguf
print('model ready in', materialize_gguf(Path('$GGUF'), cache_dir() / 'smollm2-135m'))" || exit 5
        # GPTQ (llm-compressor pins transformers 5.17 and auto-round 0.15.1): a site of its own, seen only by
        # the GPTQ child through a wrapper interpreter
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target $W/gptq-site .gpu2/whl-gptq/*.whl || exit 6
        touch $W/model.ok
    fi
    printf '#!/bin/sh\nPYTHONPATH=%s/gptq-site:$PYTHONPATH exec python3 "$@"\n' $W > $W/gptq-python
    chmod +x $W/gptq-python
    # the peers comparison (issue 27 item 4) at auto-round's full default: 128 x 2048 tokens, 200 iterations.
    # Rows already committed under bench/results/gpu are reused (each row is a record keyed on its recipe);
    # every finished row comes back in $OUT/gpu, so a run cut by the time limit loses only the row under way.
    mkdir -p "$OUT/gpu" && cp -r bench/results/gpu/. "$OUT/gpu/" 2>/dev/null
    SIGNROUND_GPTQ_PY=$W/gptq-python timeout "${PEERS_TIMEOUT:-540}" python3 bench/compare_peers.py \
        --device cuda --configs "${CONFIGS:-2:128:asym,3:128:sym,4:128:asym}" --seeds "${SEEDS:-42}" \
        --budgets "${BUDGETS:-default}" --nsamples 128 --seqlen 2048 --batch-size 8 \
        --eval-windows "${WINDOWS:-40}" --work $W/peers --results "$OUT/gpu" 2>&1 | tee "$OUT/peers.log"
    ;;
c)
    [ -f $W/model.ok ] || { echo "no joined model on this machine: run stages a and b first"; exit 3; }
    TOK=$(python3 -c "from signround.model.load import cache_dir; print(cache_dir() / 'smollm2-135m')")
    timeout "${BLOCK_TIMEOUT:-300}" python3 bench/gpu_block_timing.py --tokenizer "$TOK" --work $W/blk \
        --results "$OUT" 2>&1 | tee "$OUT/block.log"
    if [ -n "${SMOL:-}" ]; then  # SMOL=1: also one SmolLM2-shaped block, with signround --use-last (about 3 min)
        timeout "${SMOL_TIMEOUT:-240}" python3 bench/gpu_block_timing.py --tokenizer "$TOK" --work $W/blk \
            --shape smollm2 --tools signround,signround-last,auto-round --nsamples 128 --seqlen 512 \
            --iters 20,220 --name gpu-block-timing-smollm2 --results "$OUT" 2>&1 | tee "$OUT/block-smollm2.log"
    fi
    ;;
*)
    echo "usage: bench/gpu_device.sh a|b|c (on the lent GPU machine; see the header)"; exit 2
    ;;
esac
