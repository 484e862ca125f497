"""Launch scripts against a fake ``gcloud`` / ``cinema-jax`` on PATH: the exact command lines, in order."""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAKE = """#!/usr/bin/env bash
printf '%q ' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
if [[ -n "${FAKE_FAIL:-}" && "$*" == *"$FAKE_FAIL"* ]]; then exit 7; fi
"""
POD = ["--name", "pod", "--zone", "us-central2-b", "--accelerator", "v4-16", "--project", "proj",
       "--config", "configs/train_keyframes.py:tiny", "--workdir", "gs://bucket/run 1"]  # fmt: skip
COMMON = ["--zone=us-central2-b", "--project=proj"]
TRAIN = (
  "cd ~/cinema_jax && cinema-jax train --config configs/train_keyframes.py:tiny --workdir gs://bucket/run\\ 1 "
  "--config.train.batch_size=16 2>&1 | tee ~/train.log"
)


def _run(script, args, tmp_path, fail=None):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in ("gcloud", "cinema-jax"):
    (bin_dir / name).write_text(FAKE)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.log"
  log.write_text("")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
  if fail:
    env["FAKE_FAIL"] = fail
  proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=tmp_path, env=env, capture_output=True,
                        text=True)  # fmt: skip
  calls = [shlex.split(line) for line in log.read_text().splitlines()]
  printed = [shlex.split(line) for line in proc.stdout.splitlines()]
  return proc, calls, printed


def _pod_expected(install):
  return [
    [
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "pod",
      *COMMON,
      "--accelerator-type=v4-16",
      "--version=tpu-ubuntu2204-base",
    ],
    *install,
    ["compute", "tpus", "tpu-vm", "ssh", "pod", *COMMON, "--worker=all", f"--command={TRAIN}"],
    ["compute", "tpus", "tpu-vm", "scp", "pod:~/train.log", "./logs/", *COMMON, "--worker=0"],
    ["compute", "tpus", "tpu-vm", "delete", "pod", *COMMON, "--quiet"],
  ]


def test_tpu_pod_with_local_source(tmp_path):
  proc, calls, printed = _run(
    "tpu_pod.sh", [*POD, "--source", "/src/cj", "--", "--config.train.batch_size=16"], tmp_path
  )
  assert proc.returncode == 0, proc.stderr
  install = [
    ["compute", "tpus", "tpu-vm", "scp", "--recurse", "/src/cj", "pod:~/cinema_jax", *COMMON, "--worker=all"],
    ["compute", "tpus", "tpu-vm", "ssh", "pod", *COMMON, "--worker=all",
     "--command=cd ~/cinema_jax && python3 -m pip install -e '.[tpu]'"],
  ]  # fmt: skip
  assert calls == _pod_expected(install)
  assert printed == [["gcloud", *c] for c in calls]  # every command is echoed as it runs
  assert (tmp_path / "logs").is_dir()


def test_tpu_pod_git_clone_dry_run_runs_nothing(tmp_path):
  args = [*POD, "--repo", "https://example.com/cj.git", "--ref", "v1", "--keep", "--dry-run", "--",
          "--config.train.batch_size=16"]  # fmt: skip
  proc, calls, printed = _run("tpu_pod.sh", args, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  install = [
    ["compute", "tpus", "tpu-vm", "ssh", "pod", *COMMON, "--worker=all",
     "--command=git clone https://example.com/cj.git ~/cinema_jax && cd ~/cinema_jax && git checkout v1 && "
     "python3 -m pip install -e '.[tpu]'"],
  ]  # fmt: skip
  assert printed == [["gcloud", *c] for c in _pod_expected(install)[:-1]]  # --keep: no delete
  assert not (tmp_path / "logs").exists()


def test_tpu_pod_failed_training_still_fetches_logs_and_deletes(tmp_path):
  proc, calls, _ = _run("tpu_pod.sh", [*POD, "--", "--config.train.batch_size=16"], tmp_path, fail="cinema-jax train")
  assert proc.returncode == 7
  assert calls[-2][3] == "scp" and calls[-1][3] == "delete"


@pytest.mark.parametrize("missing", ["--name", "--workdir"])
def test_tpu_pod_requires_arguments(tmp_path, missing):
  args = list(POD)
  i = args.index(missing)
  del args[i : i + 2]
  proc, calls, _ = _run("tpu_pod.sh", args, tmp_path)
  assert proc.returncode == 2 and calls == []
  assert f"{missing} is required" in proc.stderr


def test_gpu_host_command_line(tmp_path):
  args = ["--gpus", "4", "--config", "configs/train_video.py:skyreels_1p3b", "--workdir", "/runs/r1", "--",
          "--config.train.batch_size=32"]  # fmt: skip
  proc, calls, printed = _run("gpu_host.sh", args, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert calls == [["train", "--config", "configs/train_video.py:skyreels_1p3b", "--workdir", "/runs/r1",
                    "--config.train.batch_size=32"]]  # fmt: skip
  assert printed == [[
    "env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
    "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "cinema-jax", *calls[0],
  ]]  # fmt: skip
  proc, calls, _ = _run("gpu_host.sh", ["--gpus", "0", "--config", "c", "--workdir", "w"], tmp_path)
  assert proc.returncode == 2 and calls == [] and "--gpus must be a positive integer" in proc.stderr


# A stand-in interpreter for hopper_checks.sh: logs its arguments with the variables the steps set, sleeps where asked,
# fails where asked.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%q ' "${JAX_PLATFORMS:-}" "${CINEMA_MOSAIC_GPU_FWD_OVERLAP:-}" "${CINEMA_MOSAIC_GPU_FWD_STEPS:-}" \
  "${CINEMA_MOSAIC_GPU_FWD_CTAS:-}" "${PART:-}" "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
echo "ran: $*"
if [[ -n "${FAKE_SLOW:-}" && "$*" == *"$FAKE_SLOW"* ]]; then sleep 30; fi
if [[ -n "${FAKE_FAIL:-}" && "$*" == *"$FAKE_FAIL"* ]]; then exit 3; fi
"""


def _hopper(tmp_path, args, **env):
  python = tmp_path / "fake-python"
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  anchors = tmp_path / "anchors"
  anchors.mkdir(exist_ok=True)
  (anchors / "gpu_anchor_bench.py").write_text("")
  log = tmp_path / "calls.log"
  log.write_text("")
  env = dict(os.environ, FAKE_LOG=str(log), **env)
  for name in ("JAX_PLATFORMS", "PART", *(f"CINEMA_MOSAIC_GPU_FWD_{v}" for v in ("OVERLAP", "STEPS", "CTAS"))):
    env.pop(name, None)
  command = ["bash", str(ROOT / "launch" / "hopper_checks.sh"), "--python", str(python), "--anchors", str(anchors)]
  proc = subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
  calls = [shlex.split(line) for line in log.read_text().splitlines()]
  return proc, calls, anchors


def test_hopper_checks_run_every_step_in_order_into_the_output_folder(tmp_path):
  proc, calls, anchors = _hopper(tmp_path, ["--out", "results"], FAKE_FAIL="import tokamax")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "results"
  bench = ["-m", "cinema_jax.cli", "bench", "attention", "--queue", "10", "--device-time"]
  fwd = ["--lengths", "16384", "--masks", "dense,8-segment", "--impls", "pallas", "--no-backward"]
  assert calls[0][5:] == [
    *bench, "--lengths", "4096,16384", "--masks", "dense,8-segment,frame-causal", "--impls", "pallas,cudnn",
    "--json", f"{out}/targets.json",
  ]  # fmt: skip
  # The forward's variants, each through its setting: overlapped softmax, three-slot ring, persistent.
  variants = [(c[1:4], c[5:]) for c in calls[1:4]]  # (overlap, ring slots, CTAs), arguments
  assert variants == [
    (["1", "", ""], [*bench, *fwd, "--json", f"{out}/overlap.json"]),
    (["", "3", ""], [*bench, *fwd, "--json", f"{out}/ring3.json"]),
    (["", "", "sm"], [*bench, *fwd, "--json", f"{out}/persistent.json"]),
  ]
  assert calls[4][0] == "cuda"  # the tests run on the GPU, not on the CPU the suite defaults to
  assert calls[4][5:] == [
    "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_kernels_mosaic_gpu.py", "-m", "hopper"
  ]  # fmt: skip
  assert calls[5][5:10] == ["-m", "cinema_jax.cli", "bench", "attention", "--profile-kernels"]
  script = str(anchors / "gpu_anchor_bench.py")
  assert [c[4:] for c in calls[6:8]] == [["jax", script], ["torch", script]]
  assert calls[8][5:] == ["-c", "import tokamax"]  # it does not import: its script does not run
  log = (out / "checks.log").read_text()
  assert log.count("ran: ") == 8  # every step's output is in the log (not the check for tokamax)
  summary = log[log.index("== summary") :].splitlines()[1:]
  assert [line.split(":")[0].strip() for line in summary] == [
    "targets", "variants", "variants", "variants", "tests", "profile", "anchors", "anchors", "anchors"
  ]  # fmt: skip
  assert "anchors:tokamax: skipped (tokamax does not import)" in summary[-1]


def test_hopper_checks_keep_to_the_budget_and_say_what_failed(tmp_path):
  args = ["--out", "r", "--steps", "tests,targets,anchors", "--budget", "4", "--min-step", "2"]
  proc, calls, _ = _hopper(tmp_path, args, FAKE_SLOW="pytest")
  assert proc.returncode == 1
  assert len(calls) == 1 and "pytest" in calls[0]  # the slow tests took the whole budget: nothing else started
  log = (tmp_path / "r" / "checks.log").read_text()
  assert "tests: cut off at 4 s" in log
  assert "== targets: skipped" in log and "anchors:tokamax: skipped (no time left)" in log
  proc, calls, _ = _hopper(tmp_path, ["--out", "r", "--steps", "anchors"], FAKE_FAIL="gpu_anchor_bench")
  assert proc.returncode == 1 and "anchors:jax: failed (exit 3)" in (tmp_path / "r" / "checks.log").read_text()


@pytest.mark.parametrize(
  ("args", "message"),
  [
    ([], "--out is required"),
    (["--out", "r", "--steps", "targets,speed"], "unknown step 'speed'"),
    (["--out", "r", "--budget", "ten"], "--budget must be a positive integer (seconds), got 'ten'"),
    (["--out", "r", "--steps", ""], "--steps names no step"),
    (["--out", "r", "--budget"], "--budget needs a value"),
  ],
)
def test_hopper_checks_refuse_bad_arguments_before_running_anything(tmp_path, args, message):
  proc, calls, _ = _hopper(tmp_path, args)
  assert proc.returncode == 2 and calls == [] and message in proc.stderr
  assert not (tmp_path / "r").exists()


def test_hopper_checks_dry_run_prints_and_creates_nothing(tmp_path):
  proc, calls, _ = _hopper(tmp_path, ["--out", "r", "--dry-run"])
  assert proc.returncode == 0 and calls == [] and not (tmp_path / "r").exists()
  printed = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert len(printed) == 9 and printed[4][:2] == ["env", "JAX_PLATFORMS=cuda"]


def test_hopper_checks_take_an_interpreter_given_by_a_relative_path(tmp_path):
  # The steps run from the project's root: a relative interpreter path is made absolute first.
  _hopper(tmp_path, ["--out", "r", "--dry-run"])  # writes the stand-in interpreter
  env = dict(os.environ, FAKE_LOG=str(tmp_path / "calls.log"))
  command = ["bash", str(ROOT / "launch" / "hopper_checks.sh"), "--python", "./fake-python", "--out", "r"]
  proc = subprocess.run([*command, "--steps", "targets"], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "targets: ok" in (tmp_path / "r" / "checks.log").read_text()
