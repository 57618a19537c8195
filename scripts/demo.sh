#!/usr/bin/env bash
# The demo: trains PFENet with Singular Value Fine-tuning on a small synthetic dataset on the CPU
# and prints the validation mIoU on the fold's novel classes before and after training.
#
# Steps: libtorch set-up (scripts/setup-libtorch.sh), release build, synthetic data into
# data/synth (once), training with configs/demo.yaml into runs/demo (replaced on every run).
# About 1.5 minutes on 2 cores once the dependencies are built (their first build takes longer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)

bash scripts/setup-libtorch.sh
cargo build --release --quiet --bin svf-train --bin svf-data

data=data/synth
if [ ! -f "$data/lists/train.txt" ]; then
  ./target/release/svf-data synth --out "$data" --size 112
fi

run=runs/demo
rm -rf "$run"
# One libtorch thread: on 2 cores the other feeds the episode loader, and OpenMP threads spinning
# against the loader slow training down instead of speeding it up.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ./target/release/svf-train --config configs/demo.yaml --device cpu

# Validation records of metrics.jsonl: the first is before training, the last after it.
miou() {
  grep '"kind":"val"' "$run/metrics.jsonl" | sed -E 's/.*"miou":([-0-9.eE+]+).*/\1/' | "$1" -n 1
}
untrained=$(miou head)
trained=$(miou tail)
awk -v u="$untrained" -v t="$trained" -v s="$(($(date +%s) - started))" 'BEGIN {
  printf "\nvalidation mIoU, novel classes of fold 0 (%s)\n", "configs/demo.yaml"
  printf "  %-10s %-10s %s\n", "untrained", "trained", "gain"
  printf "  %-10.2f %-10.2f %+.2f\n", 100 * u, 100 * t, 100 * (t - u)
  printf "demo finished in %d s\n", s
}'
