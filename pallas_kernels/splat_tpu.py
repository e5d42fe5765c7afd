"""Mosaic TPU kernels for `pallas_kernels.splat` (forward and backward on the same padded layout).

TPU blocks want their last two dimensions in multiples of (8, 128). Gaussians and pixels go on the 128-wide
lane axis (block_k = 128, block_p = 128 or 256), channels and the 8 geometry numbers on the 8-row sublane
axis, so the wrappers transpose the canonical layout of `splat._Layout`: features to [B, Cp, Kp] for the
forward product out^T[C, P] = f^T[C, Kb] @ w[Kb, P], the cotangent to [B, Cp, Pp] for the backward, and the
geometry to [B, Kp, 8] so that each number is a [Kb, 1] column. The reduction axis (Gaussian blocks in the
forward, pixel blocks in the backward) is the last grid axis, marked "arbitrary": the output block stays in
VMEM across it and accumulates, so no two programs write the same block and the sums are deterministic.
Pixel centres come in as a small [8, Pp] array (rows px, py) rather than as integer division on the
vector unit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import splat

_HIGHEST = jax.lax.Precision.HIGHEST


def _pixel_rows(layout) -> jax.Array:
  """[8, Pp]: row 0 px, row 1 py, the rest zero; padded pixels carry a zero cotangent, so they add nothing."""
  rows = jnp.stack(splat.pixel_centres(layout.height, layout.width))
  return jnp.pad(rows, ((0, splat.NUM_GEOMETRY_ROWS - 2), (0, layout.padded_p - layout.num_pixels)))


def _tile(geom_ref, pix_ref, layout):
  rows = [geom_ref[:, r:r + 1] for r in range(6)]  # [Kb, 1]
  return splat.gaussian_tile(rows, pix_ref[0:1, :], pix_ref[1:2, :], layout.cutoff) + (rows,)  # [Kb, P]


def _forward_kernel(geom_ref, pix_ref, feats_t_ref, out_ref, *, layout):
  @pl.when(pl.program_id(2) == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  w = _tile(geom_ref, pix_ref, layout)[0]
  out_ref[...] += jnp.dot(feats_t_ref[...], w, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _backward_kernel(geom_ref, pix_ref, feats_ref, cot_t_ref, dgeom_ref, dfeats_ref, *, layout):
  """Accumulates the gradients of `splat._geometry_grads`, one pixel block per grid step.

  The geometry gradients are linear in the pixel sums, so each step adds its share directly.
  """
  @pl.when(pl.program_id(2) == 0)
  def _():
    dgeom_ref[...] = jnp.zeros_like(dgeom_ref)
    dfeats_ref[...] = jnp.zeros_like(dfeats_ref)

  w, u, v, dx, dy, rows = _tile(geom_ref, pix_ref, layout)
  cot_t = cot_t_ref[...]  # [C, P]
  dw = jnp.dot(feats_ref[...], cot_t, precision=_HIGHEST, preferred_element_type=jnp.float32)  # [Kb, P]
  dfeats_ref[...] += jax.lax.dot_general(w, cot_t, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                         preferred_element_type=jnp.float32)
  # The same formulas as the GPU kernels (one definition), with the pixels along the lanes.
  terms = splat._geometry_terms(w, u, v, dx, dy, dw)
  grads = splat._geometry_grads(rows, [jnp.sum(t, axis=1, keepdims=True) for t in terms])
  # Lane-wise select instead of six one-lane stores: the update is one full [Kb, 8] block.
  lane = jax.lax.broadcasted_iota(jnp.int32, dgeom_ref.shape, 1)
  dgeom_ref[...] += sum(jnp.where(lane == r, g, 0.0) for r, g in enumerate(grads))


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(geom, feats, layout):
  """geom [B, 8, Kp], feats [B, Kp, Cp] -> [B, Pp, Cp]."""
  b = geom.shape[0]
  kp, cp, pp = layout.padded_k, layout.padded_c, layout.padded_p
  bk, bp, rows = layout.blocks.block_k, layout.blocks.block_p, splat.NUM_GEOMETRY_ROWS
  out_t = pl.pallas_call(
      functools.partial(_forward_kernel, layout=layout),
      grid=(b, pp // bp, kp // bk),
      in_specs=[pl.BlockSpec((None, bk, rows), lambda i, j, k: (i, k, 0)),
                pl.BlockSpec((rows, bp), lambda i, j, k: (0, j)),
                pl.BlockSpec((None, cp, bk), lambda i, j, k: (i, 0, k))],
      out_specs=pl.BlockSpec((None, cp, bp), lambda i, j, k: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((b, cp, pp), jnp.float32),
      compiler_params=_params(), interpret=layout.interpret, name="splat_forward_tpu",
  )(geom.transpose(0, 2, 1), _pixel_rows(layout), feats.transpose(0, 2, 1))
  return out_t.transpose(0, 2, 1)


def backward(geom, feats, cotangent, layout):
  """Gradients of sum(cotangent * forward(geom, feats)) with respect to geom and feats."""
  b = geom.shape[0]
  kp, cp, pp = layout.padded_k, layout.padded_c, layout.padded_p
  bk, bp, rows = layout.blocks.block_k, layout.blocks.block_p, splat.NUM_GEOMETRY_ROWS
  dgeom_t, dfeats = pl.pallas_call(
      functools.partial(_backward_kernel, layout=layout),
      grid=(b, kp // bk, pp // bp),
      in_specs=[pl.BlockSpec((None, bk, rows), lambda i, k, j: (i, k, 0)),
                pl.BlockSpec((rows, bp), lambda i, k, j: (0, j)),
                pl.BlockSpec((None, bk, cp), lambda i, k, j: (i, k, 0)),
                pl.BlockSpec((None, cp, bp), lambda i, k, j: (i, 0, j))],
      out_specs=[pl.BlockSpec((None, bk, rows), lambda i, k, j: (i, k, 0)),
                 pl.BlockSpec((None, bk, cp), lambda i, k, j: (i, k, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kp, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, kp, cp), jnp.float32)],
      compiler_params=_params(), interpret=layout.interpret, name="splat_backward_tpu",
  )(geom.transpose(0, 2, 1), _pixel_rows(layout), feats, cotangent.transpose(0, 2, 1))
  return dgeom_t.transpose(0, 2, 1), dfeats
