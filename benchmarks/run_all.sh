#!/usr/bin/env bash
# Run every benchmark once, one after another (never two at a time: emulated devices share the
# CPU), writing each one's JSON and log into DIR (default benchmarks/results/latest).
set -u
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/latest}
mkdir -p "$out"
py=.venv/bin/python
for b in fusion emulation plan_search plan_quality prediction pipeline calibration plan_space straggler recovery memory big_model data_loader slow_link serve fuzz; do
  echo "== $b (load average $(cut -d' ' -f1 /proc/loadavg))"
  start=$(date +%s)
  PYTHONPATH=src $py benchmarks/$b.py --json "$out/$b.json" > "$out/$b.log" 2>&1
  echo "   exit $? in $(( $(date +%s) - start )) s"
done
