"""Per-image PSNR (two protocols) and SSIM, on the device; the batch pooling of the reference's PSNR on the host.

Two PSNRs are reported because the reference's number is not the usual one (docs/evaluation.md):

* `psnr`: the usual per-image PSNR on [0, 1] floats, averaged over images (what `train.step.eval_step` reports).
* `psnr_uint8`: the reference's protocol: both images quantised to uint8 by truncation, divided by 255, and the
  MSE pooled over each batch of 64 images before taking 10 log10(1 / MSE); the mean over batches. The reference
  passes whole batches to skimage's per-image PSNR, which pools the squared error over the batch. Pooling is
  done here on fixed groups of `REFERENCE_BATCH` consecutive images (the reference's evaluation batch), so on one
  process the value does not depend on this project's evaluation batch size. With several processes the images
  arrive in the order their shards are gathered (each global batch holds process 0's images, then process 1's),
  so the groups, and the value, can differ a little from one process's.

SSIM is the reference's setting, scikit-image's `structural_similarity` defaults: 7x7 uniform window, K1 0.01,
K2 0.03, data range 1, sample (N - 1) covariances, the mean over the windows that lie inside the image (skimage
crops the 3-pixel border its reflect padding affects) and over channels, on the truncated uint8 images / 255.
dm-pix's `ssim` does not fit: it has only a Gaussian window and population covariances.

Originals are uint8 pixels; reconstructions are the model's [-1, 1] floats, mapped to [0, 255] and clipped
(`pixels.to_pixels`), then truncated (`pixels.truncate_to_uint8`).
The originals' uint8 values are used as they are (the reference's float round trip can truncate a pixel to
one below its value; that artefact is not reproduced).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gaussiantoken_jax import pixels
from gaussiantoken_jax.checks import check_positive_int

REFERENCE_BATCH = 64
SSIM_WINDOW = 7
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
# A perfect reconstruction would give +inf; capping the MSE at 1e-10 caps PSNR at 100 dB (as eval_step does).
_MIN_MSE = 1e-10


def _check_pair(where: str, a, b) -> None:
  for name, x in (("a", a), ("b", b)):
    if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"{where}: `{name}` must be an array [B, H, W, C] with C in (1, 3), got "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"{where}: `a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image mean squared error [B] of two image batches [B, H, W, C] (float32)."""
  _check_pair("mse", a, b)
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image PSNR [B] in dB of images in [0, 1] (data range 1), capped at 100 dB."""
  return -10.0 * jnp.log10(jnp.maximum(mse(a, b), _MIN_MSE))


def block_baseline_cells(num_tokens: int, image_size: int) -> int:
  """Side of the trivial baseline's grid: the largest g with g * g <= num_tokens whose blocks tile the image.

  A tokenizer with `num_tokens` tokens per image should beat the image described by as many block means
  (g * g RGB values); for 64 tokens on 32-pixel images that is an 8 x 8 grid of 4-pixel blocks.
  """
  if num_tokens < 1 or image_size < 1:
    raise ValueError(f"block_baseline_cells: num_tokens and image_size must be positive, got {num_tokens} and "
                     f"{image_size}.")
  cells = math.isqrt(num_tokens)
  while cells > 1 and image_size % cells:
    cells -= 1
  return cells


def block_average(images: jax.Array, cells: int) -> jax.Array:
  """Each image [B, H, W, C] replaced by the means of a `cells` x `cells` grid of equal blocks (nearest upsampling)."""
  batch, height, width, channels = images.shape
  if height % cells or width % cells:
    raise ValueError(f"block_average: a {cells} x {cells} grid must tile the images, got {height} x {width}.")
  blocks = images.reshape(batch, cells, height // cells, cells, width // cells, channels)
  means = jnp.mean(blocks, axis=(2, 4), keepdims=True)
  return jnp.broadcast_to(means, blocks.shape).reshape(images.shape)


def pooled_psnr(per_image_mse, group_size: int = REFERENCE_BATCH) -> float:
  """The reference's PSNR from per-image MSEs (images of equal size, in evaluation order).

  Consecutive groups of `group_size` images (the last one may be smaller) each give 10 log10(1 / mean MSE);
  the result is the mean over groups.
  """
  per_image_mse = np.asarray(per_image_mse, np.float64)
  if per_image_mse.ndim != 1:
    raise ValueError(f"pooled_psnr: `per_image_mse` must be a vector [N], got shape {per_image_mse.shape}.")
  check_positive_int("pooled_psnr", "group_size", group_size)
  if per_image_mse.size == 0:
    return math.nan
  groups = [per_image_mse[i:i + group_size].mean() for i in range(0, per_image_mse.size, group_size)]
  return float(np.mean([-10.0 * np.log10(max(g, _MIN_MSE)) for g in groups]))


def _box_mean(x: jax.Array, window: int) -> jax.Array:
  """Mean over every window x window block that lies inside the image ('valid'): [B, H-w+1, W-w+1, C]."""
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1), "VALID")
  return summed / (window * window)


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 1.0, window: int = SSIM_WINDOW) -> jax.Array:
  """Per-image SSIM [B] with scikit-image's defaults (uniform window, sample covariances), float32.

  Args:
    a, b: images [B, H, W, C], H and W >= `window`, values in a range of width `data_range`.
  """
  _check_pair("ssim", a, b)
  if min(a.shape[1:3]) < window:
    raise ValueError(f"ssim: images must be at least {window}x{window}, got {a.shape[1]}x{a.shape[2]}.")
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  # Second moments are taken of copies shifted by each image's mean: (co)variances do not change, and the
  # float32 cancellation in E[x^2] - E[x]^2 shrinks with the magnitudes.
  a_centred = a - jnp.mean(a, axis=(1, 2, 3), keepdims=True)
  b_centred = b - jnp.mean(b, axis=(1, 2, 3), keepdims=True)
  mean_a, mean_b = _box_mean(a, window), _box_mean(b, window)
  mean_ac, mean_bc = _box_mean(a_centred, window), _box_mean(b_centred, window)
  sample_correction = window * window / (window * window - 1.0)
  var_a = sample_correction * (_box_mean(a_centred * a_centred, window) - mean_ac * mean_ac)
  var_b = sample_correction * (_box_mean(b_centred * b_centred, window) - mean_bc * mean_bc)
  cov_ab = sample_correction * (_box_mean(a_centred * b_centred, window) - mean_ac * mean_bc)
  c1 = (_SSIM_K1 * data_range) ** 2
  c2 = (_SSIM_K2 * data_range) ** 2
  ssim_map = ((2.0 * mean_a * mean_b + c1) * (2.0 * cov_ab + c2)
              / ((mean_a * mean_a + mean_b * mean_b + c1) * (var_a + var_b + c2)))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def reference_protocol_metrics(originals: jax.Array, x_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(per-image MSE for `pooled_psnr`, per-image SSIM) of uint8 originals and [-1, 1] reconstructions.

  Both on the reference's truncated-uint8 / 255 images (the originals are uint8 already).
  """
  if originals.dtype != jnp.uint8:
    raise ValueError(f"reference_protocol_metrics: `originals` must be uint8 pixels, got {originals.dtype}.")
  a = originals.astype(jnp.float32) / 255.0
  b = pixels.truncate_to_uint8(pixels.to_pixels(x_hat)).astype(jnp.float32) / 255.0
  return mse(a, b), ssim(a, b)
