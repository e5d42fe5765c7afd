"""Single-level multi-scale deformable attention (MSDA, Deformable-DETR) as the Gaussian embedder uses it.

Each query predicts, per head, `num_points` sampling offsets (in feature-map pixels) around its reference point
plus one extra point fixed at ZERO offset, i.e. at the reference point itself, and softmax weights over those
`num_points + 1` samples. The reference code meant the extra point to sit at zero but, through an init bug,
freezes it at a random offset; we use the intended zero (docs/differences.md).

Sampling is bilinear with zeros outside the map at pixel coordinate `loc * W - 0.5` (PyTorch's `grid_sample`
with `align_corners=False, padding_mode="zeros"`): pixel (row i, column j) sits at the normalised point
((j + 0.5) / W, (i + 0.5) / H), the same geometry as `gaussiantoken_jax.splatting.splat`.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# The four bilinear corners as (row step, column step) from the top-left neighbour.
_CORNER_ROW_STEPS = np.array([0, 0, 1, 1])
_CORNER_COL_STEPS = np.array([0, 1, 0, 1])


def bilinear_sample(value: jax.Array, locations: jax.Array) -> jax.Array:
  """Bilinearly samples a per-head feature map at normalised locations, zeros outside the map.

  Args:
    value: [B, h, w, heads, dh] the map to sample, per head.
    locations: [B, Q, heads, P, 2] normalised (x, y) points, x along columns (width), y along rows (height);
      [0, 1] spans the map's outer pixel edges, points outside it are allowed.

  Returns:
    [B, Q, heads, P, dh] float32. Corner pixels outside the map contribute zero; differentiable in both
    arguments (the gradient in `locations` is that of the piecewise-bilinear interpolant).
  """
  batch, height, width, heads, head_dim = value.shape
  value = value.astype(jnp.float32)
  locations = locations.astype(jnp.float32)

  col = locations[..., 0] * width - 0.5  # [B, Q, heads, P] in pixel-index space
  row = locations[..., 1] * height - 0.5
  col0 = jnp.floor(col)
  row0 = jnp.floor(row)
  col_frac = (col - col0)[..., None]
  row_frac = (row - row0)[..., None]
  corner_cols = col0[..., None] + _CORNER_COL_STEPS  # [B, Q, heads, P, 4]
  corner_rows = row0[..., None] + _CORNER_ROW_STEPS
  corner_weights = (jnp.where(_CORNER_COL_STEPS == 1, col_frac, 1.0 - col_frac) *
                    jnp.where(_CORNER_ROW_STEPS == 1, row_frac, 1.0 - row_frac))
  inside = (corner_cols >= 0) & (corner_cols <= width - 1) & (corner_rows >= 0) & (corner_rows <= height - 1)
  corner_weights = jnp.where(inside, corner_weights, 0.0)
  # Outside corners get weight 0 above, so any in-range index will do for them: clip. Then a row gather per
  # image from its map flattened to [h*w*heads, dh], whose row (row*w + col)*heads + head is that head's pixel:
  # the result comes out in its final layout, with no transposes around the gather. The image stays a batch
  # dimension of the gather, so that a batch split over devices stays split (one gather over the whole batch's
  # flattened map cannot be partitioned, and came out replicated on every device).
  pixel = (jnp.clip(corner_rows, 0, height - 1) * width + jnp.clip(corner_cols, 0, width - 1)).astype(jnp.int32)
  row_index = pixel * heads + jnp.arange(heads, dtype=jnp.int32).reshape(heads, 1, 1)  # [B, Q, heads, P, 4]
  table = value.reshape(batch, height * width * heads, head_dim)
  corners = jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0, mode="clip"))(table, row_index)
  return jnp.einsum("bqhpc,bqhpcd->bqhpd", corner_weights, corners, precision=jax.lax.Precision.HIGHEST)


def grid_offset_bias_init(num_heads: int, num_points: int):
  """Deformable-DETR's sampling-offset bias: head k looks along angle 2*pi*k/heads, point i at (i+1) pixels.

  Each head's direction (cos, sin) is divided by its larger absolute component, so the four heads of the
  default get (1, 0), (0, 1), (-1, 0), (0, -1). Layout of the flat bias: [heads, points, 2] (x, y).
  """

  def init(key, shape, dtype=jnp.float32):
    del key  # deterministic
    angles = np.arange(num_heads) * (2.0 * math.pi / num_heads)
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    directions /= np.abs(directions).max(axis=-1, keepdims=True)
    grid = directions[:, None, :] * np.arange(1, num_points + 1)[None, :, None]
    return jnp.asarray(grid.reshape(-1), dtype)

  return init


class DeformableAttention(nn.Module):
  """Single-level deformable attention with `num_points` learned points and one fixed at the reference point.

  Attributes:
    dim: model width D (queries, values and output).
    num_heads: attention heads; D must be divisible by it.
    num_points: learned sampling points per head; one more, at zero offset, is always added as point 0.
  """
  dim: int = 64
  num_heads: int = 4
  num_points: int = 4

  def setup(self):
    if self.dim % self.num_heads:
      raise ValueError(f"DeformableAttention: `dim` ({self.dim}) must be divisible by `num_heads` "
                       f"({self.num_heads}).")
    xavier = nn.initializers.xavier_uniform()
    # Zero weights: every query starts at the same grid of offsets and at uniform attention over its samples.
    self.sampling_offsets = nn.Dense(self.num_heads * self.num_points * 2, kernel_init=nn.initializers.zeros,
                                     bias_init=grid_offset_bias_init(self.num_heads, self.num_points))
    self.attention_weights = nn.Dense(self.num_heads * (self.num_points + 1), kernel_init=nn.initializers.zeros,
                                      bias_init=nn.initializers.zeros)
    self.value_proj = nn.Dense(self.dim, kernel_init=xavier)
    self.output_proj = nn.Dense(self.dim, kernel_init=xavier)

  def sampling_locations(self, query: jax.Array, reference_points: jax.Array,
                         spatial_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Where each query samples and with what weight.

    Args:
      query: [B, Q, D].
      reference_points: [B, Q, 2] normalised (x, y) in [0, 1].
      spatial_shape: (h, w) of the value map; offsets are in its pixels.

    Returns:
      locations [B, Q, heads, points + 1, 2] normalised (x, y), point 0 the fixed one at the reference point;
      weights [B, Q, heads, points + 1], softmax-normalised over the points of each head.
    """
    batch, num_queries, _ = query.shape
    height, width = spatial_shape
    query = query.astype(jnp.float32)
    offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, self.num_points, 2)
    offsets = jnp.concatenate([jnp.zeros_like(offsets[..., :1, :]), offsets], axis=-2)
    pixel_size = jnp.array([width, height], jnp.float32)
    locations = reference_points.astype(jnp.float32)[:, :, None, None, :] + offsets / pixel_size
    logits = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, self.num_points + 1)
    return locations, jax.nn.softmax(logits, axis=-1)

  def __call__(self, query: jax.Array, reference_points: jax.Array, value: jax.Array,
               spatial_shape: Sequence[int]) -> jax.Array:
    """Deformable attention of `query` into a single-level value map.

    Args:
      query: [B, Q, D] (the caller adds any positional embedding).
      reference_points: [B, Q, 2] normalised (x, y) in [0, 1], x along columns.
      value: [B, h*w, D] the map's tokens in row-major order (no positional embedding).
      spatial_shape: (h, w) of the value map, Python ints.

    Returns:
      [B, Q, D] float32.
    """
    locations, weights = self.sampling_locations(query, reference_points, spatial_shape)
    height, width = spatial_shape
    batch, num_queries, _ = query.shape
    head_dim = self.dim // self.num_heads
    value_map = self.value_proj(value.astype(jnp.float32)).reshape(batch, height, width, self.num_heads, head_dim)
    samples = bilinear_sample(value_map, locations)  # [B, Q, heads, points + 1, dh]
    attended = jnp.einsum("bqhp,bqhpd->bqhd", weights, samples, precision=jax.lax.Precision.HIGHEST)
    return self.output_proj(attended.reshape(batch, num_queries, self.dim))
