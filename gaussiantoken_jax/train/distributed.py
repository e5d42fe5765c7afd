"""Multi-process start-up: `jax.distributed.initialize` when (and only when) a launch script asks for it.

The launch scripts in `launch/` say how the processes find each other through environment variables, so that
`python -m gaussiantoken_jax.main` stays the same command everywhere:

  GAUSSIANTOKEN_DISTRIBUTED=auto       let JAX detect the cluster (SLURM, Cloud TPU, Open MPI, ...);
  GAUSSIANTOKEN_COORDINATOR_ADDRESS    host:port of process 0, with
  GAUSSIANTOKEN_NUM_PROCESSES          the number of processes and
  GAUSSIANTOKEN_PROCESS_ID             this process's index (e.g. several processes on one machine).

Without any of them the run is a single process and nothing is initialised, so notebooks and tests that
have already used JAX can call `train_and_evaluate` directly.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging

ENV_AUTO = "GAUSSIANTOKEN_DISTRIBUTED"
ENV_COORDINATOR = "GAUSSIANTOKEN_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "GAUSSIANTOKEN_NUM_PROCESSES"
ENV_PROCESS_ID = "GAUSSIANTOKEN_PROCESS_ID"


def _read_int(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name} must be an integer, got {value!r}.") from None


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` as the environment asks (see the module docstring).

  Returns True if this call initialised the distributed runtime, False if the environment asks for a single
  process or the runtime was already initialised. Raises ValueError on incomplete or malformed variables.
  """
  environ = os.environ if environ is None else environ
  auto = environ.get(ENV_AUTO, "")
  explicit = [name for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if environ.get(name)]
  if not auto and not explicit:
    return False
  if auto not in ("", "auto"):
    raise ValueError(f"Environment variable {ENV_AUTO} must be 'auto' or unset, got {auto!r}.")
  if jax.distributed.is_initialized():
    return False
  if explicit:
    if len(explicit) != 3:
      raise ValueError(f"Set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or none), "
                       f"got only {explicit}.")
    num_processes = _read_int(environ, ENV_NUM_PROCESSES)
    process_id = _read_int(environ, ENV_PROCESS_ID)
    if not 0 <= process_id < num_processes:
      raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes}).")
    jax.distributed.initialize(coordinator_address=environ[ENV_COORDINATOR], num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed initialised: process %d of %d, %d local and %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str, timeout_seconds: int = 3600) -> None:
  """Waits until every process has reached `name` (a no-op with one process). A name can be met again once all
  processes have passed it (a second `train_and_evaluate` in the same processes reuses the trainer's names).

  Uses the coordination service, not a device collective: CPU (gloo) collectives give up after 30 s when a
  process arrives late, e.g. because it compiled longer, so processes meet here before their first collective.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_seconds * 1000)
