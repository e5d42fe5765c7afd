"""Splatting featured 2D Gaussians onto a feature map: the public `splat` op.

out[b, i, j] = sum_k w_bkij * features[b, k],  w = exp(-0.5 d^T Sigma^-1 d), w := 0 where w < cutoff,

with Sigma = R diag(s)^2 R^T (paper Eq. 6-7) and d the offset from the Gaussian's centre to the pixel centre.
Pixel (row i, column j) sits at the continuous point (j + 0.5, i + 0.5); a Gaussian with mean (mx, my) in
[-1, 1] is centred at ((mx + 1) / 2 * width, (my + 1) / 2 * height). The deformable attention samples at
loc * W - 0.5 in pixel-index space, which is the same geometry.

This module holds the argument checks, the dense XLA path and the dispatch. The XLA path is written for one
image and vmapped over the batch: it materialises a [K, H, W] weight tensor per image (B*K*H*W in all, at
most 256 x 32 x 32 floats an image in the paper's settings), and JAX autodiff gives exact gradients for all
four inputs (the reference CUDA backward double-counts the off-diagonal covariance term; see
docs/differences.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gaussiantoken_jax.checks import check_float_array

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def _check_args(means, rotations, scales, features, height, width, cutoff, impl) -> None:
  check_float_array("splat", "means", means, "[B, K, 2]", 3, last_dim=2)
  check_float_array("splat", "rotations", rotations, "[B, K]", 2)
  check_float_array("splat", "scales", scales, "[B, K, 2]", 3, last_dim=2)
  check_float_array("splat", "features", features, "[B, K, C]", 3)
  b, k = means.shape[:2]
  for name, x in (("rotations", rotations), ("scales", scales), ("features", features)):
    if tuple(x.shape[:2]) != (b, k):
      raise ValueError(
          f"splat: `{name}` must share the leading [B, K] = [{b}, {k}] of `means`, got shape {tuple(x.shape)}.")
  for name, n in (("height", height), ("width", width)):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ValueError(f"splat: `{name}` must be a positive Python int, got {n!r}.")
  if not isinstance(cutoff, (int, float)) or not 0.0 <= cutoff < 1.0:
    raise ValueError(f"splat: `cutoff` must be a float in [0, 1), got {cutoff!r}.")
  if impl not in IMPLS:
    raise ValueError(f"splat: `impl` must be one of {IMPLS}, got {impl!r}.")


def gaussian_weights(means, rotations, scales, *, height: int, width: int, cutoff: float):
  """Per-Gaussian weights for ONE image: means [K, 2], rotations [K], scales [K, 2] -> [K, H, W] float32."""
  cx = (means[:, 0] + 1.0) * (0.5 * width)
  cy = (means[:, 1] + 1.0) * (0.5 * height)
  dx = (jnp.arange(width, dtype=jnp.float32) + 0.5)[None, None, :] - cx[:, None, None]  # [K, 1, W]
  dy = (jnp.arange(height, dtype=jnp.float32) + 0.5)[None, :, None] - cy[:, None, None]  # [K, H, 1]
  cos = jnp.cos(rotations)[:, None, None]
  sin = jnp.sin(rotations)[:, None, None]
  # d^T R diag(s)^-2 R^T d: rotate d into the Gaussian's own axes (R^T d), then scale each axis.
  u = (cos * dx + sin * dy) / scales[:, 0, None, None]
  v = (cos * dy - sin * dx) / scales[:, 1, None, None]
  w = jnp.exp(-0.5 * (u * u + v * v))
  return jnp.where(w >= cutoff, w, 0.0)


def _splat_one_image(means, rotations, scales, features, *, height, width, cutoff):
  w = gaussian_weights(means, rotations, scales, height=height, width=width, cutoff=cutoff)
  return jnp.einsum("khw,kc->hwc", w, features, precision=jax.lax.Precision.HIGHEST)


def splat_xla(means, rotations, scales, features, *, height: int, width: int, cutoff: float):
  """Dense XLA path, float32 in and out, no argument checks (see `splat`)."""
  one = functools.partial(_splat_one_image, height=height, width=width, cutoff=cutoff)
  return jax.vmap(one)(means, rotations, scales, features)


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
    impl: "xla", "pallas" (GPU kernel), "pallas_interpret" (the kernel under the Pallas interpreter) or
      "auto" (pallas on GPU, else xla).

  Returns:
    [B, height, width, C] in the dtype of `features`; computed in float32 whatever the input dtype.
  """
  _check_args(means, rotations, scales, features, height, width, cutoff, impl)
  out_dtype = features.dtype
  args = [jnp.asarray(a, jnp.float32) for a in (means, rotations, scales, features)]
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "xla"
  if impl == "xla":
    out = splat_xla(*args, height=height, width=width, cutoff=float(cutoff))
  else:
    if not _pallas_available():
      raise NotImplementedError(f"splat: impl={impl!r} needs the Pallas kernel (pallas_kernels.splat), which is "
                                "not in this build yet; use impl='xla'.")
    from pallas_kernels import splat as pallas_splat  # pylint: disable=import-outside-toplevel
    out = pallas_splat.splat(*args, height=height, width=width, cutoff=float(cutoff),
                             interpret=(impl == "pallas_interpret"))
  return out.astype(out_dtype)


def _pallas_available() -> bool:
  try:
    from pallas_kernels import splat as _  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True
