#!/usr/bin/env bash
# One short, prepared GPU run for a session that is lent a device (about 10 minutes of device time in all):
# decode and training figures at the real shapes, ours and transformers' side by side on the same machine.
#   device run:  bash bench/gpu_session.sh        (writes JSON lines under ${OUT:-bench/gpu_results})
# Test it first on CPU at toy widths:  SHRINK=--shrink DEVICE=cpu bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu_results}"; mkdir -p "$out"
device="${DEVICE:-cuda}"; shrink="${SHRINK:-}"
export HF_HUB_OFFLINE=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"; echo "$name: exit $?"
}
# batch 1 greedy decode: the issue's ms/step targets (default dynamic cache, then static cache)
run gen_vicuna7b 150 python bench/bench_generate.py --device "$device" --preset vicuna7b $shrink --batches 1 --beams 1
run gen_vicuna7b_static 150 python bench/bench_generate.py --device "$device" --preset vicuna7b $shrink --batches 1 --beams 1 --cache-implementation static
run gen_flant5xl 120 python bench/bench_generate.py --device "$device" --preset flant5xl $shrink --batches 1 --beams 1
run train_vicuna7b 150 python bench/bench_train.py --device "$device" --preset vicuna7b $shrink --backbones llama
