"""Multi-process start-up: one call at the top of a program, before anything touches a JAX device.

Where the coordinator, process count and process id come from, in order:

1. the arguments of ``initialize``;
2. the environment: ``CINEMA_JAX_COORDINATOR`` (host:port of process 0), ``CINEMA_JAX_NUM_PROCESSES``,
   ``CINEMA_JAX_PROCESS_ID`` - for launchers that jax cannot detect (plain ssh, a 2-process CPU test);
3. nothing given: a cluster that ``jax.distributed.initialize()`` detects by itself (Cloud TPU VM / GKE TPU, a SLURM
   step with more than one task, Open MPI's ``mpirun``) gets that argument-less call;
4. otherwise this is a single process and nothing is started.

The decision is the pure function ``resolve_distributed`` so that it can be tested without starting a runtime.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax

ENV_COORDINATOR = "CINEMA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CINEMA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CINEMA_JAX_PROCESS_ID"

# Variables jax's own cluster detection reads (jax/_src/clusters): SLURM needs all five, Open MPI (<= 4) the ORTE
# URI, GKE / multislice TPU the worker list or the megascale coordinator.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_VAR = "OMPI_MCA_orte_hnp_uri"
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
  """What ``initialize`` will do: ``single`` (nothing), ``auto`` (argument-less jax call) or ``explicit``."""

  mode: Literal["single", "auto", "explicit"]
  source: str  # why: "arguments/environment", "tpu", "slurm", "ompi", "single process"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def initialize_kwargs(self) -> dict[str, Any]:
    """Keyword arguments for ``jax.distributed.initialize``; empty for ``auto`` except local devices."""
    kwargs: dict[str, Any] = {}
    if self.mode == "explicit":
      kwargs.update(
        coordinator_address=self.coordinator_address,
        num_processes=self.num_processes,
        process_id=self.process_id,
      )
    if self.local_device_ids is not None:
      kwargs["local_device_ids"] = list(self.local_device_ids)
    return kwargs


def _int_from(value: int | str | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def detect_cluster(env: Mapping[str, str], tpu_present: bool = False) -> str | None:
  """The launcher jax would detect with no arguments: "tpu", "slurm", "ompi", or None.

  A SLURM step or mpirun with a single task counts as no cluster: starting a coordinator service for one process
  buys nothing and can collide on the fixed port jax derives from the job id.
  """
  platforms = env.get("JAX_PLATFORMS", "")
  if (tpu_present or any(env.get(v) for v in _TPU_VARS)) and (not platforms or "tpu" in platforms):
    return "tpu"
  if all(v in env for v in _SLURM_VARS) and (_int_from(env["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if _OMPI_VAR in env and (_int_from(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 2) > 1:
    return "ompi"
  return None


def resolve_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  env: Mapping[str, str],
  tpu_present: bool = False,
) -> DistributedPlan:
  """Decides how to start (see the module docstring); raises ValueError for a spec given only in part."""
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_from(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_from(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if isinstance(local_device_ids, int):
    local_device_ids = (local_device_ids,)
  elif local_device_ids is not None:
    local_device_ids = tuple(int(i) for i in local_device_ids)

  given = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  env_names = {
    "coordinator_address": ENV_COORDINATOR,
    "num_processes": ENV_NUM_PROCESSES,
    "process_id": ENV_PROCESS_ID,
  }
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  # "One process" is a complete spec on its own: launch scripts often export the count unconditionally.
  if num_processes == 1 and coordinator_address is None and process_id in (None, 0) and local_device_ids is None:
    return DistributedPlan("single", "single process")

  if all(v is not None for v in given.values()):
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is outside [0, {num_processes}) (num_processes={num_processes})")
    return DistributedPlan(
      "explicit", "arguments/environment", coordinator_address, num_processes, process_id, local_device_ids
    )
  if any(v is not None for v in given.values()):
    missing = [f"{k} (or ${env_names[k]})" for k, v in given.items() if v is None]
    present = {k: v for k, v in given.items() if v is not None}
    raise ValueError(f"incomplete multi-process spec: got {present} but missing {', '.join(missing)}")

  cluster = detect_cluster(env, tpu_present)
  if cluster is not None:
    return DistributedPlan("auto", cluster, local_device_ids=local_device_ids)
  if local_device_ids is not None:
    raise ValueError(
      f"local_device_ids={local_device_ids} given without a multi-process spec: also set coordinator_address, "
      f"num_processes and process_id (or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})"
    )
  return DistributedPlan("single", "single process")


def _tpu_chips_present() -> bool:
  """TPU chips on this host, judged from libtpu and the device files only (no backend start, no metadata query)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
) -> bool:
  """Starts the JAX multi-process runtime if this program is one of several processes.

  Returns True when the runtime is running after the call (started now or by an earlier call: a second call is a
  no-op), False for a single process (nothing is started). Must run before the first use of a JAX device.
  """
  if jax.distributed.is_initialized():
    return True
  plan = resolve_distributed(
    coordinator_address,
    num_processes,
    process_id,
    local_device_ids,
    env=os.environ,
    tpu_present=_tpu_chips_present(),
  )
  if plan.mode == "single":
    return False
  jax.distributed.initialize(**plan.initialize_kwargs())
  return True
