#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one run on a lent GPU machine (about 10 min
# on an H100 with the benchmark slides already generated; a fresh machine generates them
# first). Logs go to ${OUT:-gpu-check}/.  Usage: bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
run() {  # run NAME SECONDS CMD...: each step bounded, the next one runs whatever happens
  local name=$1 secs=$2; shift 2
  echo "=== $name" | tee -a "$out/summary.txt"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "exit $?" >> "$out/$name.log"
  tail -n 25 "$out/$name.log" | tee -a "$out/summary.txt"
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
run gpu-tests 240 "$py" -m pytest -q -p no:cacheprovider -m gpu
run cohort-resnet18 300 "$py" benchmarks/bench_inference.py --device cuda --arch resnet18 --only-cohort --cohort 5
run cohort-resnet50 300 "$py" benchmarks/bench_inference.py --device cuda --arch resnet50 --only-cohort --cohort 5
run ratios-resnet18 300 "$py" benchmarks/bench_inference.py --device cuda --skip-rss --no-wsi
run ratios-resnet50 300 "$py" benchmarks/bench_inference.py --device cuda --skip-rss --no-wsi --arch resnet50
run outputs 120 "$py" benchmarks/bench_outputs.py
