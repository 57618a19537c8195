#!/usr/bin/env bash
# Reproduces the paper's tables. Two grids:
#
#   --recipe paper (default): the SVF paper's rows (its Tables 1 and 2): PASCAL-5i and COCO-20i, folds
#     0-3, 1- and 5-shot, ResNet-50 and VGG-16, each method with and without SVF.
#       PFENet† and PFENet†+SVF under the authors' recipe, configs/paper/ (64 runs).
#       BAM† (BAM's recipe) and BAM†+SVF (the authors' recipe), configs/bam/ (64 runs), after BAM's
#       base stage, one run per dataset, fold and backbone (16 runs, OUT/<dataset>/split<F>/
#       <backbone>/base), trained before the first meta run that needs it and not evaluated.
#     Evaluation: `svf-eval --protocol paper` (1000 episodes for each of the seeds 510, 365, 382,
#     322, 988; the mean is reported).
#   --recipe pfenet: PFENet's own recipe from configs/{pascal,coco}_split{F}.yaml, ResNet-50, with
#     and without SVF (32 runs), evaluated with five seeds drawn from master seed 123.
#
# Each run trains (svf-train) then evaluates (svf-eval) into OUT/<run name>; finally svf-report
# writes OUT/tables.md, every cell beside the published one.
# A run whose eval.json exists is skipped; one whose training finished is only evaluated; one whose
# training was interrupted (a `last` checkpoint, no `train_done` mark) resumes with
# `svf-train --resume`. Re-running the script therefore continues the grid where it stopped.
set -euo pipefail
# svf-train saves `last` on Ctrl-C; stop here too instead of marking the run trained.
trap 'echo "reproduce_tables.sh: interrupted; run it again to continue" >&2; exit 130' INT

usage() {
    cat <<'USAGE'
Usage: scripts/reproduce_tables.sh [options]
  --recipe paper|pfenet  which grid (default paper; see the header of this script)
  --dry-run              list the runs (and commands) without running anything
  --only PATTERN         only the runs whose name contains PATTERN (a shell glob inside it is
                         allowed), e.g. --only pascal/split0/resnet50/1shot/svf, --only 'coco/*/5shot'
  --out DIR              output folder, one run directory per run (default: $SVF_TABLES_OUT or
                         runs/tables, runs/tables-pfenet for --recipe pfenet)
  --config-dir DIR       configs folder (default: configs/paper; configs for --recipe pfenet)
  --bam-config-dir DIR   BAM's configs folder (default: configs/bam)
  --methods "LIST"       subset of "pfenet bam" (the pfenet recipe: pfenet only)
  --bin-dir DIR          folder holding svf-train, svf-eval, svf-report (default: cargo build --release)
  --datasets "LIST"      subset of "pascal coco"
  --folds "LIST"         subset of "0 1 2 3"
  --shots "LIST"         subset of "1 5"
  --svf "LIST"           subset of "false true"
  --backbones "LIST"     subset of "resnet50 vgg16", names in the config file names (other names
                         with --config-dir / --bam-config-dir; the pfenet recipe: resnet50 only)
  --episodes N           evaluation episodes per seed (default: the protocol's 1000)
  --seed-count N         pfenet recipe: seeds drawn from master seed 123 (default 5)
  --device DEV           auto, cpu, cuda, cuda:N (default auto)
  --set KEY=VALUE        config override passed to training and evaluation (repeatable)
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
recipe=paper
out=""
config_dir=""
bam_config_dir="$root/configs/bam"
methods=""
bin_dir=""
datasets="pascal coco"
folds="0 1 2 3"
shots="1 5"
svf_modes="false true"
backbones=""
only=""
episodes=""
seed_count=5
master_seed=123
device=auto
dry_run=0
sets=()
config_dirs_given=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run | -h | --help) ;;
        -*) [[ $# -ge 2 ]] || { echo "reproduce_tables.sh: $1 needs a value" >&2; usage >&2; exit 2; } ;;
    esac
    case "$1" in
        --recipe) recipe="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --only) only="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --config-dir) config_dir="$2"; config_dirs_given=1; shift 2 ;;
        --bam-config-dir) bam_config_dir="$2"; config_dirs_given=1; shift 2 ;;
        --methods) methods="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --datasets) datasets="$2"; shift 2 ;;
        --folds) folds="$2"; shift 2 ;;
        --shots) shots="$2"; shift 2 ;;
        --svf) svf_modes="$2"; shift 2 ;;
        --backbones) backbones="$2"; shift 2 ;;
        --episodes) episodes="$2"; shift 2 ;;
        --seed-count) seed_count="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --set) sets+=(--set "$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "reproduce_tables.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Every word of a subset option must name a part of the grid.
check_subset() {
    local word
    for word in $2; do
        [[ " $3 " == *" $word "* ]] ||
            { echo "reproduce_tables.sh: $1 takes words of \"$3\", not $word" >&2; exit 2; }
    done
}
check_subset --methods "$methods" "pfenet bam"
check_subset --datasets "$datasets" "pascal coco"
check_subset --folds "$folds" "0 1 2 3"
check_subset --shots "$shots" "1 5"
check_subset --svf "$svf_modes" "false true"
# Other backbone names are those of the configs in a --config-dir or --bam-config-dir.
if [[ $config_dirs_given -eq 0 ]]; then
    check_subset --backbones "$backbones" "resnet50 vgg16"
fi

case "$recipe" in
    paper)
        config_dir="${config_dir:-$root/configs/paper}"
        out="${out:-${SVF_TABLES_OUT:-runs/tables}}"
        methods="${methods:-pfenet bam}"
        backbones="${backbones:-resnet50 vgg16}" ;;
    pfenet)
        # Its configs, {pascal,coco}_split{F}.yaml, are PFENet on ResNet-50 only.
        for word in $backbones; do
            if [[ "$word" != resnet50 ]]; then
                echo "reproduce_tables.sh: --recipe pfenet trains ResNet-50 only (configs/{pascal,coco}_split{F}.yaml), not $word; the VGG-16 rows are in --recipe paper (--backbones vgg16)" >&2
                exit 2
            fi
        done
        if [[ " $methods " == *" bam "* ]]; then
            echo "reproduce_tables.sh: --recipe pfenet trains PFENet only; BAM's rows are in --recipe paper (--methods bam)" >&2
            exit 2
        fi
        config_dir="${config_dir:-$root/configs}"
        out="${out:-${SVF_TABLES_OUT:-runs/tables-pfenet}}"
        backbones="resnet50"
        methods="pfenet" ;;
    *) echo "reproduce_tables.sh: --recipe must be paper or pfenet, not $recipe" >&2; exit 2 ;;
esac

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

# Stops the script after svf-train of run $1 ended with status $2 instead of finishing: 130 (143)
# when Ctrl-C (SIGTERM) reached svf-train alone (`kill -INT`, this script started in the background),
# with `last` saved; else an error. The run is not marked trained, so running the script again
# resumes it.
training_stopped() {
    echo "reproduce_tables.sh: training of $1 stopped (svf-train exit status $2); run the script again to continue" >&2
    exit "$2"
}

# Trains run directory $1 with the training command that follows, or resumes it, unless it finished
# (a `train_done` mark).
train_run() {
    local dir="$1" name="$2"
    shift 2
    if [[ -f "$dir/train_done" ]]; then
        echo "== $name: already trained"
    elif [[ -f "$dir/last.safetensors" ]]; then
        echo "== $name: resuming training"
        "$bin_dir/svf-train" --resume "$dir" --device "$device" || training_stopped "$name" $?
        touch "$dir/train_done"
    else
        echo "== $name: training"
        "$@" || training_stopped "$name" $?
        touch "$dir/train_done"
    fi
}

runs=0
bases=0
for dataset in $datasets; do
    for fold in $folds; do
        for backbone in $backbones; do
            for method in $methods; do
                # BAM's base learner of this dataset, fold and backbone: its run directory, and
                # whether it has been listed or trained in this invocation.
                base_dir="$out/$dataset/split$fold/$backbone/base"
                base_ready=0
                if [[ "$backbone" == vgg16 ]]; then bam_suffix=_vgg16; else bam_suffix=""; fi
                for shot in $shots; do
                    for svf in $svf_modes; do
                        if [[ "$recipe" == pfenet ]]; then
                            if [[ "$svf" == true ]]; then variant=svf; else variant=baseline; fi
                            name="$dataset/split$fold/${shot}shot/$variant"
                            config="$config_dir/${dataset}_split${fold}.yaml"
                            variant_sets=(--set "svf=$svf")
                            eval_protocol=(--episodes "${episodes:-1000}" --master-seed "$master_seed"
                                           --seed-count "$seed_count")
                        else
                            if [[ "$method" == bam ]]; then
                                if [[ "$svf" == true ]]; then variant=bam_svf; file=svf; else variant=bam; file=bam; fi
                                config="$bam_config_dir/${dataset}_split${fold}${bam_suffix}_${file}.yaml"
                                variant_sets=(--set "base_learner=$base_dir")
                            else
                                if [[ "$svf" == true ]]; then variant=svf; else variant=pfenet; fi
                                config="$config_dir/${dataset}_split${fold}_${backbone}_${variant}.yaml"
                                variant_sets=()
                            fi
                            name="$dataset/split$fold/$backbone/${shot}shot/$variant"
                            eval_protocol=(--protocol paper)
                            if [[ -n "$episodes" ]]; then eval_protocol+=(--episodes "$episodes"); fi
                        fi
                        # shellcheck disable=SC2053 # PATTERN may hold a glob on purpose.
                        if [[ -n "$only" && "$name" != *$only* ]]; then
                            continue
                        fi
                        if [[ ! -f "$config" ]]; then
                            echo "reproduce_tables.sh: missing config $config; pass --config-dir or --bam-config-dir" >&2
                            exit 1
                        fi
                        dir="$out/$name"
                        runs=$((runs + 1))
                        common=(--config "$config" ${variant_sets[@]+"${variant_sets[@]}"}
                                --set "shot=$shot" --set "save_path=$dir"
                                ${sets[@]+"${sets[@]}"} --device "$device")
                        train=("$bin_dir/svf-train" "${common[@]}")
                        evaluate=("$bin_dir/svf-eval" "${common[@]}" --weights "$dir"
                                  "${eval_protocol[@]}" --out "$dir")
                        if [[ "$method" == bam && $base_ready -eq 0 && ! -f "$dir/eval.json" ]]; then
                            base_name="$dataset/split$fold/$backbone/base"
                            base_config="$bam_config_dir/${dataset}_split${fold}${bam_suffix}_base.yaml"
                            base_train=("$bin_dir/svf-train" --config "$base_config"
                                        --set "save_path=$base_dir"
                                        ${sets[@]+"${sets[@]}"} --device "$device")
                            bases=$((bases + 1))
                            base_ready=1
                            if [[ ! -f "$base_config" ]]; then
                                echo "reproduce_tables.sh: missing config $base_config; pass --bam-config-dir" >&2
                                exit 1
                            fi
                            if [[ $dry_run -eq 1 ]]; then
                                echo "base $bases: $base_name"
                                echo "  $(show "${base_train[@]}")"
                            else
                                train_run "$base_dir" "$base_name" "${base_train[@]}"
                            fi
                        fi
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
                        train_run "$dir" "$name" "${train[@]}"
                        echo "== $name: evaluating"
                        "${evaluate[@]}"
                    done
                done
            done
        done
    done
done

if [[ $runs -eq 0 ]]; then
    echo "reproduce_tables.sh: no run matches --only '$only' and the subsets given" >&2
    exit 1
fi
report=("$bin_dir/svf-report" "$out" --out "$out/tables.md")
if [[ $dry_run -eq 1 ]]; then
    echo "$runs runs ($bases base stages); then: $(show "${report[@]}")"
    exit 0
fi
"${report[@]}"
