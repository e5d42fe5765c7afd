"""Pixel scaling, in one place: uint8 pixels <-> the model's [-1, 1] floats.

* `to_model_input`: uint8 -> float32 in [-1, 1], on the device inside the jitted steps (the host ships uint8,
  a quarter of the bytes).
* `to_pixels`: [-1, 1] -> float pixel values in [0, 255], clipped, not rounded (what Inception is fed, as the
  reference feeds it floats).
* `to_uint8`: [-1, 1] -> uint8 rounded to the nearest level, on the host, for pictures.
* `truncate_to_uint8`: float pixels -> uint8 by truncation, the reference's evaluation protocol
  (`.to(torch.uint8)`), used by its PSNR and SSIM (`evaluation.image_metrics`); distinct from `to_uint8` on
  purpose.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_model_input(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] pixels -> float32 in [-1, 1] (x / 127.5 - 1); meant to run inside the jitted step."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"`images` must have shape [B, H, W, 3], got {tuple(images.shape)}.")
  if images.dtype != jnp.uint8:
    raise ValueError(f"`images` must have dtype uint8, got {images.dtype}.")
  # Centre first: x / 127.5 - 1 compiles to x * float32(1 / 127.5) - 1, which gives 1.0000001 for 255, while
  # (x - 127.5) * float32(1 / 127.5) rounds to exactly -1 and 1 at the ends.
  return (jnp.asarray(images).astype(jnp.float32) - 127.5) / 127.5


def to_pixels(x: jax.Array) -> jax.Array:
  """Model output in [-1, 1] -> float pixel values in [0, 255] (clipped, not rounded)."""
  return jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)


def to_uint8(x) -> np.ndarray:
  """Model output in [-1, 1] (a host array) -> uint8 pixels rounded to the nearest level, for pictures."""
  return np.round(np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def truncate_to_uint8(pixels: jax.Array) -> jax.Array:
  """Float pixel values in [0, 255] -> the uint8 the reference gets with `.to(torch.uint8)` (truncation)."""
  return jnp.floor(jnp.clip(pixels, 0.0, 255.0)).astype(jnp.uint8)
