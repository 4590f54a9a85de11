#!/bin/bash
# Runs the named discrete-event presets with their reports, one after the other, timing each:
#   bench/sim_presets.sh consumer-1b datacenter-diloco datacenter ddp-wan laptops folding-at-home
cd "$(dirname "$0")/.."
mkdir -p bench/results docs/sim
for s in "$@"; do
  start=$(date +%s)
  COLUMNS=160 .venv/bin/crowdtrain simulate --scenario "$s" --json "bench/results/sim-$s.json" --plot "docs/sim/$s" > "bench/results/sim-$s.txt" 2>&1
  rc=$?
  echo "$s rc=$rc wall_s=$(( $(date +%s) - start ))" | tee -a bench/results/sim-walltimes.txt
done
