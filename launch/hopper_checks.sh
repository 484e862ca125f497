#!/usr/bin/env bash
# The hardware checks of the Mosaic GPU kernels on one Hopper GPU, in one go, within a time budget:
#
#   launch/hopper_checks.sh --out DIR [--budget SECONDS] [--steps LIST] [--anchors DIR] [--python PY]
#       [--min-step SECONDS] [--dry-run]
#
# Steps, in the order given (default: targets,variants,tests,profile,anchors):
#   targets   bench attention at L = 4096 and 16384: dense, 8-segment, frame-causal; ours beside cuDNN, with queued
#             and device times (DIR/targets.json)
#   variants  the forward with its softmax overlapped, with a three-slot ring, and persistent (DIR/overlap.json,
#             DIR/ring3.json, DIR/persistent.json)
#   tests     tests/test_kernels_mosaic_gpu.py on the GPU: the Hopper cases against XLA
#   profile   the forward's in-kernel profile on 8-segment and dense (its summaries go to the log)
#   anchors   the peer scripts in --anchors: their JAX and PyTorch parts, and tokamax where it is installed
#             (DIR/anchor_*.json); skipped without --anchors
# Everything printed also goes to DIR/checks.log, which ends with each step's status and seconds. A step starts only
# with --min-step seconds (default 60) of the budget (default 540) left, and is cut off where the budget ends. The exit
# status is 1 when a step failed, was cut off or found no time left.
# --python picks the interpreter with JAX, flax and this project importable (default python3). --dry-run prints the
# command lines and runs nothing.
set -uo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

out="" budget=540 steps="targets,variants,tests,profile,anchors" anchors="" py="python3" min_step=60 dry_run=0
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --* && "$1" != --dry-run && "$1" != --help && $# -lt 2 ]]; then
    echo "hopper_checks.sh: $1 needs a value" >&2
    usage
  fi
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --anchors) anchors="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --min-step) min_step="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "hopper_checks.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
if [[ -z "$out" ]]; then
  echo "hopper_checks.sh: --out is required" >&2
  usage
fi
for number in budget min_step; do
  if ! [[ "${!number}" =~ ^[1-9][0-9]*$ ]]; then
    echo "hopper_checks.sh: --${number//_/-} must be a positive integer (seconds), got '${!number}'" >&2
    exit 2
  fi
done
IFS=, read -r -a order <<< "$steps"
if [[ ${#order[@]} -eq 0 ]]; then
  echo "hopper_checks.sh: --steps names no step" >&2
  exit 2
fi
for step in "${order[@]}"; do
  case "$step" in
    targets|tests|profile|variants|anchors) ;;
    *) echo "hopper_checks.sh: unknown step '$step' (targets, tests, profile, variants, anchors)" >&2; exit 2 ;;
  esac
done
if [[ -n "$anchors" && ! -f "$anchors/gpu_anchor_bench.py" ]]; then
  echo "hopper_checks.sh: --anchors $anchors holds no gpu_anchor_bench.py" >&2
  exit 2
fi

# Paths as given from here, before moving to the project's root (the tests' paths are relative to it).
[[ -z "$anchors" ]] || anchors="$(realpath "$anchors")"
# An interpreter given by path: absolute, without resolving links (a virtual environment's python is one).
[[ "$py" != */* ]] || py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
out="$(realpath -m "$out")"
log="$out/checks.log"
if [[ $dry_run -eq 0 ]]; then
  mkdir -p "$out" && : > "$log" || exit 2
fi
cd "$(dirname "$0")/.." || exit 2
bench=("$py" -m cinema_jax.cli bench attention --queue 10 --device-time)
# Time in milliseconds (whole seconds would shift each reading by up to one), shown rounded to seconds.
now_ms() { local t="${EPOCHREALTIME/[.,]/}"; echo $((10#$t / 1000)); }
seconds_since() { echo $((($(now_ms) - $1 + 500) / 1000)); }
start=$(now_ms)
summary=()
failed=0

say() { echo "$*" | tee -a "$log"; }
left() { echo $((budget - $(seconds_since "$start"))); }

# run STEP CAP CMD...: CMD under the smaller of CAP and the budget left; its output to the screen and the log.
run() {
  local step="$1" cap="$2"
  shift 2
  local left line
  left=$(left)
  printf -v line '%q ' "$@"
  if [[ $dry_run -eq 1 ]]; then
    echo "${line% }"
    return
  fi
  if [[ $left -lt $min_step ]]; then
    say "== $step: skipped, ${left} s of the budget left"
    summary+=("$step: skipped (no time left)")
    failed=1
    return
  fi
  local limit=$((cap < left ? cap : left)) began rc
  began=$(now_ms)
  say "== $step (at most ${limit} s): ${line% }"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took status="ok"
  took=$(seconds_since "$began")
  # timeout's own exit statuses: 124 (its signal), 137 (the kill after); 137 sooner is another kill (memory)
  if [[ $rc -eq 124 || ($rc -eq 137 && $took -ge $limit) ]]; then
    status="cut off at ${limit} s"
    failed=1
  elif [[ $rc -ne 0 ]]; then
    status="failed (exit $rc)"
    failed=1
  fi
  say "== $step: $status, ${took} s"
  summary+=("$step: $status, ${took} s")
}

for step in "${order[@]}"; do
  case "$step" in
    targets)
      run targets 300 "${bench[@]}" --lengths 4096,16384 --masks dense,8-segment,frame-causal --impls pallas,cudnn \
        --json "$out/targets.json" ;;
    tests)
      run tests 360 env JAX_PLATFORMS=cuda "$py" -m pytest -v -p no:cacheprovider tests/test_kernels_mosaic_gpu.py \
        -m hopper ;;
    profile)
      traces="${TMPDIR:-/tmp}/cinema-profiles-$$"  # large traces: kept out of DIR
      run profile 120 "$py" -m cinema_jax.cli bench attention --profile-kernels "$traces" --lengths 16384 \
        --masks 8-segment,dense --no-backward ;;
    variants)
      run variants:overlap 120 env CINEMA_MOSAIC_GPU_FWD_OVERLAP=1 "${bench[@]}" --lengths 16384 \
        --masks dense,8-segment --impls pallas --no-backward --json "$out/overlap.json"
      run variants:ring3 120 env CINEMA_MOSAIC_GPU_FWD_STEPS=3 "${bench[@]}" --lengths 16384 --masks dense,8-segment \
        --impls pallas --no-backward --json "$out/ring3.json"
      run variants:persistent 120 env CINEMA_MOSAIC_GPU_FWD_CTAS=sm "${bench[@]}" --lengths 16384 \
        --masks dense,8-segment --impls pallas --no-backward --json "$out/persistent.json" ;;
    anchors)
      if [[ -z "$anchors" ]]; then
        [[ $dry_run -eq 1 ]] || summary+=("anchors: skipped (no --anchors)")
        continue
      fi
      run anchors:jax 240 env PART=jax OUT="$out" "$py" "$anchors/gpu_anchor_bench.py"
      run anchors:torch 240 env PART=torch OUT="$out" "$py" "$anchors/gpu_anchor_bench.py"
      # (without the time to run it, run says so rather than the check spending it)
      if [[ $dry_run -eq 1 || $(left) -lt $min_step ]] || timeout 60 "$py" -c "import tokamax" > /dev/null 2>&1; then
        run anchors:tokamax 240 env OUT="$out" "$py" "$anchors/gpu_anchor_tokamax.py"
      else
        summary+=("anchors:tokamax: skipped (tokamax does not import)")
      fi ;;
  esac
done

if [[ $dry_run -eq 0 ]]; then
  say "== summary ($(seconds_since "$start") s of a ${budget} s budget)"
  for line in "${summary[@]}"; do
    say "   $line"
  done
fi
exit $failed
