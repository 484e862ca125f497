#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, install the project on every worker, run `cinema-jax train` on all
# workers at once (one process per host; jax.distributed finds the others by itself on TPU VMs), fetch the log of
# worker 0 (the process that logs), delete the slice.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v5p-32 --config configs/train_keyframes.py:flux_dev \
#       --workdir gs://BUCKET/run1 [--version tpu-ubuntu2204-base] [--project P] [--repo URL [--ref REF]]
#       [--source DIR] [--logs DIR] [--keep] [--dry-run] [-- --config.key=value ...]
#
# Install: with --repo, every worker clones it (at --ref) and pip-installs it; otherwise the local checkout
# (--source, default: this repository) is copied to every worker with scp and installed there.
# --dry-run prints the gcloud commands, one per line, and runs nothing. --keep leaves the slice running.
# The workdir should be a bucket (gs://...) so that every host writes its checkpoint shards to the same place.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" repo="" ref="main" config="" workdir=""
source_dir="$(cd "$(dirname "$0")/.." && pwd)" logs="./logs" keep=0 dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --source) source_dir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for required in name zone accelerator config workdir; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: --${required} is required" >&2
    usage
  fi
done

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

# Prints the command (shell-quoted, one line); runs it unless --dry-run.
run() {
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

remote_dir='~/cinema_jax'
printf -v train_args '%q ' --config "$config" --workdir "$workdir" "${overrides[@]}"
train_cmd="cd ${remote_dir} && cinema-jax train ${train_args% } 2>&1 | tee ~/train.log"

run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accelerator" --version="$version"
if [[ -n "$repo" ]]; then
  install_cmd="git clone $(printf '%q' "$repo") ${remote_dir} && cd ${remote_dir} && git checkout $(printf '%q' "$ref") && python3 -m pip install -e '.[tpu]'"
else
  run gcloud compute tpus tpu-vm scp --recurse "$source_dir" "$name:${remote_dir}" "${common[@]}" --worker=all
  install_cmd="cd ${remote_dir} && python3 -m pip install -e '.[tpu]'"
fi
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$install_cmd"
status=0
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$train_cmd" || status=$?
[[ $dry_run -eq 0 ]] && mkdir -p "$logs"
run gcloud compute tpus tpu-vm scp "$name:~/train.log" "$logs/" "${common[@]}" --worker=0 || true
if [[ $keep -eq 0 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
fi
exit "$status"
