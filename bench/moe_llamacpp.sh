#!/usr/bin/env bash
# signround's GGUF files of the upcycled SmolLM2 mixture of experts (Mixtral layout, written as llama.cpp's
# `llama` architecture with expert_count) run by llama.cpp itself, beside signround's own perplexity of the
# checkpoints they came from and llama.cpp's own quantizer on signround's F16 export (not a test).
# Needs the upcycled model (bench/upcycle.py) and llama-cpp-python in the bench environment
# (bench/requirements-bench.txt). Writes bench/results/llamacpp-moe.md.
#
#   [WINDOWS=5] bench/moe_llamacpp.sh [UPCYCLED_FOLDER] [WORK] [ITERS]    (ITERS 0: no tuned file)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-$(ls -d bench/work/moe/smollm2-moe8x2-* | head -1)}
work=${2:-bench/work/moe-llamacpp}
iters=${3:-20}
py=.venv/bin/python
mkdir -p "$work"
common=(--model "$model" --nsamples 32 --seqlen 128 --batch-size 4 --seed 42
        --dataset "${SIGNROUND_DATA:-../shared/data}/calib-c4.jsonl" --quiet)
run() {  # run OUT FLAGS...: one quantization into OUT/{native,gguf-*}, skipped when OUT/.done records the flags
  local out=$1; shift
  local stamp="$*|$(git rev-parse HEAD)"
  if [[ -f $out/.done && $(cat "$out/.done") == "$stamp" ]]; then return; fi
  $py -m signround.cli quantize "${common[@]}" "$@" --output "$out" --overwrite
  echo "$stamp" > "$out/.done"
}
run "$work/rtn-q4_0" --method rtn --bits 4 --group-size 32 --sym --format native,gguf:q4_0
run "$work/rtn-q4_k_m" --method rtn --data-type q4_k --format native,gguf:q4_k_m
tuned=()
if (( iters > 0 )); then
  run "$work/signround-q4_k_m" --iters "$iters" --data-type q4_k --format native,gguf:q4_k_m
  tuned=(--ours "signround gguf:q4_k_m ($iters iters)=$work/signround-q4_k_m/gguf-q4_k_m"
         --native "signround gguf:q4_k_m ($iters iters)=$work/signround-q4_k_m/native")
fi
bench/.venv-bench/bin/python bench/llamacpp.py --work "$work/llama" --model "$model" --max-windows "${WINDOWS:-5}" \
  --type Q4_0 --type Q4_K_M --name llamacpp-moe \
  --ours "RTN gguf:q4_0=$work/rtn-q4_0/gguf-q4_0" --native "RTN gguf:q4_0=$work/rtn-q4_0/native" \
  --ours "RTN gguf:q4_k_m=$work/rtn-q4_k_m/gguf-q4_k_m" --native "RTN gguf:q4_k_m=$work/rtn-q4_k_m/native" \
  "${tuned[@]}"
