"""XLA compile options for the project's programs: on the CPU, convolutions stay with XLA's own emitter.

By default XLA:CPU (JAX 0.10) hands three kinds of op to its YNNPACK library: single dots, single convolutions and
reductions (`xla_cpu_experimental_ynn_fusion_type`). For this project's convolutions YNNPACK's were the slower
choice on a 2-core CPU: without them the demo's train step took 300 instead of 348 ms, the CIFAR step 2.75
instead of 3.05 s, encoding 185 instead of 237 ms and a 25-step fitted evaluation 28 instead of 41 s
(docs/benchmarks.md, "YNNPACK's convolutions"). The programs compiled for a CPU mesh (the train, eval and init
steps, the evaluation pass, the tokenizer's encode and decode) therefore keep YNNPACK's dots and reductions only;
other platforms get no options. Functions a caller may trace inside a jit of their own (`lpips_distance`,
`inception.compute_features`) keep XLA's defaults: JAX accepts `compiler_options` only on a top-level jit.

The option is experimental in XLA: a JAX whose XLA no longer knows it, or its values, compiles with the defaults
instead (one tiny probe compile per process decides, and logs a warning).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_accepted() -> bool:
  cpu = jax.local_devices(backend="cpu")[0]  # this process's own: with several processes, devices()[0] is process 0's
  probe = jax.jit(lambda x: x + 1.0).lower(jax.device_put(np.zeros(1, np.float32), cpu))
  try:
    probe.compile(compiler_options=CPU_OPTIONS)
  except jax.errors.JaxRuntimeError as err:
    logging.warning("This XLA refuses the CPU compile options %s (%s); compiling with its defaults, which run "
                    "this project's convolutions slower on the CPU.", CPU_OPTIONS, str(err).splitlines()[0])
    return False
  return True


def compiler_options(mesh: Mesh | None = None) -> dict | None:
  """`jax.jit`'s `compiler_options` for programs on `mesh` (None: the default backend): CPU_OPTIONS on the CPU,
  None elsewhere. Call it after the backend is chosen (`jax.distributed.initialize` first), not at import."""
  if mesh is not None and not isinstance(mesh, Mesh):
    raise ValueError(f"compiler_options: `mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  if platform == "cpu" and _cpu_options_accepted():
    return dict(CPU_OPTIONS)
  return None
