"""XLA compile options for the project's programs (on the CPU, convolutions stay with XLA's own emitter), and the
platform that the program being traced runs on (`platform`), which the platform-dependent formulations read.

By default XLA:CPU (JAX 0.10) hands three kinds of op to its YNNPACK library: single dots, single convolutions and
reductions (`xla_cpu_experimental_ynn_fusion_type`). For this project's convolutions YNNPACK's were the slower
choice on a 2-core CPU: without them the demo's train step took 300 instead of 348 ms, the CIFAR step 2.75
instead of 3.05 s, encoding 185 instead of 237 ms and a 25-step fitted evaluation 28 instead of 41 s
(docs/benchmarks.md, "YNNPACK's convolutions"). The programs compiled for a CPU mesh (the train, eval and init
steps, the evaluation pass, the tokenizer's encode and decode, `inception.compute_features`: 3.5 against 7.8 s
per 50 images) therefore keep YNNPACK's dots and reductions only; other platforms get no options. JAX accepts
`compiler_options` only on a top-level jit, so functions a caller may also trace inside a jit of their own are
wrapped in `jit` below, which compiles with the options when called on concrete arrays and runs a plain jit inside
a trace. `lpips_distance` on its own keeps XLA's defaults in float32: VGG16 ran as fast either way (118 against 125 ms for 16
images of 32x32, 526 against 505 ms for 4 of 128x128).

Programs whose convolutions run in bfloat16 or float16 keep YNNPACK's single dots only
(`LOW_PRECISION_CPU_OPTIONS`). Whatever the options say, XLA:CPU also hands YNNPACK a convolution that sits next to
a reduction, inside that reduction's fusion (VGG16's max-pool and the two convolutions after it, in float32 too). In
JAX 0.11 (not 0.10) such a fusion in bfloat16 returns NaN in a varying part of its outputs: LPIPS's distances in
bfloat16 all came out NaN (tests/test_lpips.py, `test_bfloat16_compute_is_close`; 2026-12-05, JAX 0.11.2 on Python
3.12), and they are right with YNNPACK's dots alone. Low-precision convolutions gain nothing on a CPU anyway.

The option is experimental in XLA: a JAX whose XLA no longer knows it, or its values, compiles with the defaults
instead (one tiny probe compile per process decides, and logs a warning).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

# jax.sharding's in JAX 0.10; also in the top-level namespace of later releases, which is tried first.
get_abstract_mesh = getattr(jax, "get_abstract_mesh", None) or jax.sharding.get_abstract_mesh

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
LOW_PRECISION_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


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


def compiler_options(mesh: Mesh | None = None, conv_dtype: Any = jnp.float32) -> dict | None:
  """`jax.jit`'s `compiler_options` for programs on `mesh` (None: the default backend) whose convolutions compute
  in `conv_dtype`: on the CPU CPU_OPTIONS, or LOW_PRECISION_CPU_OPTIONS below float32; None elsewhere. Call it
  after the backend is chosen (`jax.distributed.initialize` first), not at import."""
  if mesh is not None and not isinstance(mesh, Mesh):
    raise ValueError(f"compiler_options: `mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  if platform == "cpu" and _cpu_options_accepted():
    return dict(CPU_OPTIONS if jnp.dtype(conv_dtype) == jnp.float32 else LOW_PRECISION_CPU_OPTIONS)
  return None


def platform() -> str:
  """The platform ("cpu", "gpu", "tpu") of the program being traced: the context mesh's devices'
  (`train.sharding.traced_on`), else the default backend.

  The CPU forms of the convolutions and GroupNorm sums and the splat's choice of kernel read it at trace time, so
  that a program for a mesh of CPU devices on a GPU machine gets the CPU forms and no GPU kernel.
  """
  device = getattr(get_abstract_mesh(), "abstract_device", None)  # None without a context mesh
  return device.platform if device is not None else jax.default_backend()


def is_traced(tree) -> bool:
  """Whether any leaf of `tree` is a tracer: the call is inside a caller's jit, grad or vmap."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def jit(fn, mesh: Mesh | None = None, conv_dtype: Any = jnp.float32, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)`, compiled with `compiler_options(mesh, conv_dtype)` when called on concrete arrays.

  Inside a caller's trace the plain jit runs instead (its program becomes part of the caller's, compiled with the
  caller's options). The options are read at the first top-level call, when the backend is known. `.lower(...)`
  lowers the program a top-level call runs (`.compile()` on it applies the options), to inspect it ahead of time.
  """
  plain = jax.jit(fn, **jit_kwargs)

  @functools.cache
  def with_options():
    return jax.jit(fn, compiler_options=compiler_options(mesh, conv_dtype), **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return (plain if is_traced((args, kwargs)) else with_options())(*args, **kwargs)

  call.lower = lambda *args, **kwargs: with_options().lower(*args, **kwargs)

  return call
