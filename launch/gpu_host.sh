#!/usr/bin/env bash
# Train on one host with N GPUs: one process drives all N (a single-process JAX mesh over the local GPUs).
#
#   launch/gpu_host.sh --gpus 8 --config configs/train_video.py:skyreels_1p3b --workdir /data/runs/r1 \
#       [--mem-fraction 0.95] [--dry-run] [-- --config.key=value ...]
#
# --gpus picks GPUs 0..N-1 (CUDA_VISIBLE_DEVICES). The XLA flags turn on the latency-hiding scheduler (overlaps
# FSDP all-gathers with compute). Running the same command again resumes from the newest checkpoint in the workdir.
# --dry-run prints the command line and runs nothing.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

gpus="" config="" workdir="" mem_fraction="0.95" dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --mem-fraction) mem_fraction="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "gpu_host.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for required in gpus config workdir; do
  if [[ -z "${!required}" ]]; then
    echo "gpu_host.sh: --${required} is required" >&2
    usage
  fi
done
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_host.sh: --gpus must be a positive integer, got '$gpus'" >&2
  exit 2
fi

visible="$(seq -s, 0 $((gpus - 1)))"
cmd=(env "CUDA_VISIBLE_DEVICES=$visible" "XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction"
  "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
  cinema-jax train --config "$config" --workdir "$workdir" "${overrides[@]}")
printf -v line '%q ' "${cmd[@]}"
echo "${line% }"
if [[ $dry_run -eq 0 ]]; then
  exec "${cmd[@]}"
fi
