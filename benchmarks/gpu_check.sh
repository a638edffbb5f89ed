#!/usr/bin/env bash
# The GPU figures of docs/performance.md on a lent GPU machine, each step under its own
# time limit (all six: at most 13 min; name steps to run only those, e.g. to fit a
# per-command limit: `bash benchmarks/gpu_check.sh gpu-tests cohort-resnet18`).
# Logs go to ${OUT:-gpu-check}/. The benchmark slides are generated on first use.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
wanted=" $* "
run() {  # run NAME SECONDS CMD...: the next step runs whatever this one does
  local name=$1 secs=$2; shift 2
  if [ "$wanted" != "  " ] && [[ "$wanted" != *" $name "* ]]; then
    return
  fi
  echo "=== $name" | tee -a "$out/summary.txt"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "exit $?" >> "$out/$name.log"
  tail -n 25 "$out/$name.log" | tee -a "$out/summary.txt"
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
run gpu-tests 150 "$py" -m pytest -q -p no:cacheprovider -m gpu
run cohort-resnet18 150 "$py" benchmarks/bench_inference.py --device cuda --arch resnet18 --only-cohort --cohort 5
run cohort-resnet50 180 "$py" benchmarks/bench_inference.py --device cuda --arch resnet50 --only-cohort --cohort 5
run ratios-resnet18 120 "$py" benchmarks/bench_inference.py --device cuda --skip-rss --no-wsi
run ratios-resnet50 120 "$py" benchmarks/bench_inference.py --device cuda --skip-rss --no-wsi --arch resnet50
run outputs 60 "$py" benchmarks/bench_outputs.py
