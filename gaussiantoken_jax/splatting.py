"""Splatting featured 2D Gaussians onto a feature map: the public `splat` op.

out[b, i, j] = sum_k w_bkij * features[b, k],  w = exp(-0.5 d^T Sigma^-1 d), w := 0 where w < cutoff,

with Sigma = R diag(s)^2 R^T (paper Eq. 6-7) and d the offset from the Gaussian's centre to the pixel centre.
Pixel (row i, column j) sits at the continuous point (j + 0.5, i + 0.5); a Gaussian with mean (mx, my) in
[-1, 1] is centred at ((mx + 1) / 2 * width, (my + 1) / 2 * height). The deformable attention samples at
loc * W - 0.5 in pixel-index space, which is the same geometry.

This module holds the argument checks and the dispatch. The math is defined once, in jnp, in
`pallas_kernels.splat` (a leaf package that never imports this one), which also holds the Pallas kernels.
The XLA path (`splat_xla`) is written for one image and vmapped over the batch: it materialises a [K, H*W]
weight matrix per image (B*K*H*W in all, at most 256 x 32 x 32 floats an image in the paper's settings),
and JAX autodiff gives exact gradients for all four inputs (the reference CUDA backward double-counts the
off-diagonal covariance term; see docs/differences.md). The kernels compute the weights on chip and never
write them to device memory; their gradients are checked against autodiff of the XLA path.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gaussiantoken_jax import xla_options
from gaussiantoken_jax.checks import check_float_array
from pallas_kernels import splat as pallas_splat
from pallas_kernels.splat import splat_xla

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def _check_args(means, rotations, scales, features, height, width, cutoff, impl) -> None:
  check_float_array("splat", "means", means, "[B, K, 2]", 3, last_dim=2)
  check_float_array("splat", "rotations", rotations, "[B, K]", 2)
  check_float_array("splat", "scales", scales, "[B, K, 2]", 3, last_dim=2)
  check_float_array("splat", "features", features, "[B, K, C]", 3)
  b, k = means.shape[:2]
  if k < 1 or features.shape[2] < 1:
    raise ValueError(f"splat: needs at least one Gaussian and one feature channel, got K = {k} and "
                     f"C = {features.shape[2]} (features of shape {tuple(features.shape)}).")
  for name, x in (("rotations", rotations), ("scales", scales), ("features", features)):
    if tuple(x.shape[:2]) != (b, k):
      raise ValueError(
          f"splat: `{name}` must share the leading [B, K] = [{b}, {k}] of `means`, got shape {tuple(x.shape)}.")
  for name, n in (("height", height), ("width", width)):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ValueError(f"splat: `{name}` must be a positive Python int, got {n!r}.")
  if not isinstance(cutoff, numbers.Real) or isinstance(cutoff, bool) or not 0.0 <= cutoff < 1.0:
    raise ValueError(f"splat: `cutoff` must be a float in [0, 1), got {cutoff!r}.")
  if impl not in IMPLS:
    raise ValueError(f"splat: `impl` must be one of {IMPLS}, got {impl!r}.")


def splat(means, rotations, scales, features, *, height: int, width: int, cutoff: float = 1.0 / 255.0,
          impl: str = "auto"):
  """Splats K featured Gaussians per image onto a [height, width] map.

  Args:
    means: [B, K, 2] centres in [-1, 1]; index 0 is x (columns), index 1 is y (rows).
    rotations: [B, K] angles in radians.
    scales: [B, K, 2] standard deviations in feature-map pixels along the Gaussian's own axes.
    features: [B, K, C] the values each Gaussian carries.
    height, width: output map size.
    cutoff: weights below this are set to 0 (the reference rasteriser's alpha threshold 1/255).
    impl: "xla", "pallas" (the GPU kernel on GPU, the Mosaic TPU kernel on TPU; ValueError elsewhere),
      "pallas_interpret" (that kernel, the GPU one off TPU, under the Pallas interpreter, any platform) or
      "auto" (pallas on GPU and TPU, else xla), by the platform of the context mesh (`train.sharding.traced_on`)
      or else of the default backend.

  Returns:
    [B, height, width, C] in the dtype of `features` (float32 for float64 without jax_enable_x64); computed in
    float32 whatever the input dtype.

  Differentiable in all four arrays in reverse mode (`jax.grad`, `jax.vjp`) on every impl. The kernels'
  gradients are a `custom_vjp`, which has no forward-mode rule: `jax.jvp`, `jacfwd` and second derivatives need
  impl="xla".
  """
  _check_args(means, rotations, scales, features, height, width, cutoff, impl)
  out_dtype = jnp.result_type(features)  # float64 -> float32 without x64, as JAX would store it
  if means.shape[0] == 0:  # an empty batch: no kernel launch with an empty grid
    return jnp.zeros((0, height, width, features.shape[2]), out_dtype)
  args = [jnp.asarray(a, jnp.float32) for a in (means, rotations, scales, features)]
  impl, variant = _resolve(impl, xla_options.platform())
  if impl == "xla":
    out = splat_xla(*args, height=height, width=width, cutoff=float(cutoff))
  else:
    kernel = functools.partial(pallas_splat.splat, height=height, width=width, cutoff=float(cutoff),
                               backend=variant, interpret=(impl == "pallas_interpret"))
    out = _split_over_context_mesh(kernel, means.shape[0])(*args)
  return out.astype(out_dtype)


def _split_over_context_mesh(kernel, batch_size: int):
  """`kernel` run on each device's share of the batch when a mesh is in context (`sharding.traced_on`).

  XLA's partitioner cannot split a Pallas call: inside a jit over batch-sharded arrays it would gather the
  inputs and run the whole global batch on every device. `shard_map` hands each device its own images, split
  over every axis of the mesh as `train.sharding.batch_sharding` splits batches. Without a context mesh, on
  one device, or for a batch the mesh does not divide (the init's dummy batch), the kernel sees the whole batch.
  """
  mesh = xla_options.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or batch_size % mesh.size:
    return kernel
  spec = PartitionSpec(mesh.axis_names)
  # check_vma=False: the kernel's outputs carry no varying-axes annotations (Pallas output shapes are plain).
  return jax.shard_map(kernel, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _resolve(impl: str, platform: str) -> tuple[str, str | None]:
  """(impl, kernel variant) for a requested impl on the default platform ("cpu", "gpu", "tpu")."""
  gpu_ok = platform == "gpu" and pallas_splat.gpu_kernels_available()
  if impl == "auto":
    return ("pallas", platform) if gpu_ok or platform == "tpu" else ("xla", None)
  if impl == "pallas":
    if not (gpu_ok or platform == "tpu"):
      raise ValueError(f"splat: impl='pallas' needs a GPU with the Pallas Triton lowering or a TPU, got the "
                       f"{platform!r} platform; use impl='xla', or 'pallas_interpret' for the interpreter.")
    return impl, platform
  if impl == "pallas_interpret":
    return impl, "tpu" if platform == "tpu" else "gpu"
  return impl, None
