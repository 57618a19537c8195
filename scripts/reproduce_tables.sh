#!/usr/bin/env bash
# Reproduces the paper's tables: for PASCAL-5i and COCO-20i, folds 0-3, 1-shot and 5-shot, without
# and with SVF (32 runs), trains (svf-train) and evaluates (svf-eval) each run from
# configs/{pascal,coco}_split{F}.yaml, then aggregates every eval.json into Markdown tables beside the
# published numbers (svf-report -> OUT/tables.md).
#
# Evaluation follows BAM's protocol, which the paper's tables use (REFERENCE §6): 1000 episodes per
# fold, five seeds drawn from master seed 123, the mean of the five reported.
# A run whose eval.json exists is skipped; one whose training finished is only evaluated; one whose
# training was interrupted (a `last` checkpoint, no `train_done` mark) resumes with
# `svf-train --resume`. Re-running the script therefore continues the grid where it stopped.
set -euo pipefail
# svf-train saves and exits cleanly on Ctrl-C; stop here too instead of marking the run trained.
trap 'echo "reproduce_tables.sh: interrupted; run it again to continue" >&2; exit 130' INT

usage() {
    cat <<'USAGE'
Usage: scripts/reproduce_tables.sh [options]
  --dry-run            list the runs (and commands) without running anything
  --out DIR            output folder, one run directory per run (default: $SVF_TABLES_OUT or runs/tables)
  --config-dir DIR     folder holding {pascal,coco}_split{0..3}.yaml (default: configs)
  --bin-dir DIR        folder holding svf-train, svf-eval, svf-report (default: cargo build --release)
  --datasets "LIST"    subset of "pascal coco"
  --folds "LIST"       subset of "0 1 2 3"
  --shots "LIST"       subset of "1 5"
  --svf "LIST"         subset of "false true"
  --episodes N         evaluation episodes per seed (default 1000)
  --seed-count N       evaluation seeds drawn from master seed 123 (default 5)
  --device DEV         auto, cpu, cuda, cuda:N (default auto)
  --set KEY=VALUE      config override passed to training and evaluation (repeatable)
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${SVF_TABLES_OUT:-runs/tables}"
config_dir="$root/configs"
bin_dir=""
datasets="pascal coco"
folds="0 1 2 3"
shots="1 5"
svf_modes="false true"
episodes=1000
seed_count=5
master_seed=123
device=auto
dry_run=0
sets=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --out) out="$2"; shift 2 ;;
        --config-dir) config_dir="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --datasets) datasets="$2"; shift 2 ;;
        --folds) folds="$2"; shift 2 ;;
        --shots) shots="$2"; shift 2 ;;
        --svf) svf_modes="$2"; shift 2 ;;
        --episodes) episodes="$2"; shift 2 ;;
        --seed-count) seed_count="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --set) sets+=(--set "$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "reproduce_tables.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ -z "$bin_dir" ]]; then
    bin_dir="$root/target/release"
    if [[ $dry_run -eq 0 ]]; then
        (cd "$root" && cargo build --release --bin svf-train --bin svf-eval --bin svf-report)
    fi
fi

# Prints a command with its arguments quoted, as it would be typed.
show() {
    printf '%q ' "$@"
    printf '\n'
}

runs=0
for dataset in $datasets; do
    for fold in $folds; do
        config="$config_dir/${dataset}_split${fold}.yaml"
        if [[ $dry_run -eq 0 && ! -f "$config" ]]; then
            echo "reproduce_tables.sh: missing config $config; pass --config-dir" >&2
            exit 1
        fi
        for shot in $shots; do
            for svf in $svf_modes; do
                if [[ "$svf" == true ]]; then variant=svf; else variant=baseline; fi
                name="$dataset/split$fold/${shot}shot/$variant"
                dir="$out/$name"
                runs=$((runs + 1))
                common=(--config "$config" --set "svf=$svf" --set "shot=$shot"
                        --set "save_path=$dir" ${sets[@]+"${sets[@]}"} --device "$device")
                train=("$bin_dir/svf-train" "${common[@]}")
                evaluate=("$bin_dir/svf-eval" "${common[@]}" --weights "$dir"
                          --episodes "$episodes" --master-seed "$master_seed"
                          --seed-count "$seed_count" --out "$dir")
                if [[ $dry_run -eq 1 ]]; then
                    echo "run $runs: $name"
                    echo "  $(show "${train[@]}")"
                    echo "  $(show "${evaluate[@]}")"
                    continue
                fi
                if [[ -f "$dir/eval.json" ]]; then
                    echo "== $name: eval.json exists, skipped"
                    continue
                fi
                if [[ -f "$dir/train_done" ]]; then
                    echo "== $name: already trained"
                elif [[ -f "$dir/last.safetensors" ]]; then
                    echo "== $name: resuming training"
                    "$bin_dir/svf-train" --resume "$dir" --device "$device"
                    touch "$dir/train_done"
                else
                    echo "== $name: training"
                    "${train[@]}"
                    touch "$dir/train_done"
                fi
                echo "== $name: evaluating"
                "${evaluate[@]}"
            done
        done
    done
done

report=("$bin_dir/svf-report" "$out" --out "$out/tables.md")
if [[ $dry_run -eq 1 ]]; then
    echo "$runs runs; then: $(show "${report[@]}")"
    exit 0
fi
"${report[@]}"
