"""Splatting featured 2D Gaussians: the jnp math, the block sizes and the differentiable Pallas op.

out[b, p, :] = sum_k w[b, k, p] * features[b, k, :],  w = exp(-0.5 (u^2 + v^2)),  w := 0 where w < cutoff,

where (u, v) is the offset d from the Gaussian's centre to pixel p's centre rotated into the Gaussian's own
axes and divided by its two scales, so u^2 + v^2 = d^T Sigma^-1 d with Sigma = R diag(s)^2 R^T. Pixel
p = i * width + j sits at (j + 0.5, i + 0.5); mean (mx, my) in [-1, 1] puts the centre at
((mx + 1) / 2 * width, (my + 1) / 2 * height).

The math is written once here in jnp: `geometry` turns (means, rotations, scales) into six per-Gaussian
numbers (centre and the rows of diag(1/s) R^T), and `gaussian_tile` turns those and pixel centres into
weights. `gaussian_tile` is called by the XLA path (`splat_xla`), by the kernels on their on-chip tiles and
by the optional `backward_pass_impl="xla"`; the tests use `splat_xla` as the oracle. `geometry` stays
outside the kernels, so JAX differentiates it and the kernels' backward only returns gradients of the six
numbers and of the features.

Kernels: the GPU kernels here (Pallas Triton lowering; Ampere and Hopper) and the Mosaic TPU ones in
`splat_tpu`. Both take the same padded, canonical layout (`_Layout`) and share one `jax.custom_vjp`.

Why Triton: on the JAX 0.10 line it is the Pallas GPU lowering that runs on both Ampere and Hopper, and the
0.11 line still ships it (deprecated, with a DeprecationWarning at lowering that this module filters). When a
JAX release removes it (`jax.experimental.pallas.triton` fails to import, or `pallas_call` rejects
`pltriton.CompilerParams`): port `_forward_kernel` and `_backward_kernel` (and their loop forms) to Mosaic GPU
(`plgpu.kernel`, same tiles: the weight tile in registers, the [pixels, K] x [K, C] product with an fp32
accumulator), or move them to the official Triton bindings through jax_triton. Until then
`gaussiantoken_jax.splat(impl="auto")` takes the XLA path on GPU when `pltriton` is None
(`gpu_kernels_available()`).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Needs no GPU to import; a JAX release without the Triton lowering loses only the GPU kernels.
  from jax.experimental.pallas import triton as pltriton
except ImportError:
  pltriton = None

# 0.11 warns once per lowering that the Triton backend is deprecated; the note above says what to do, so
# users' logs need not repeat it at every jit.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

BACKENDS = ("gpu", "tpu")
BACKWARD_PASS_IMPLS = ("pallas", "xla")
NUM_GEOMETRY_ROWS = 8  # the 6 geometry numbers padded to 8 rows: one TPU sublane tile, a power of 2 for Triton


def geometry(means, rotations, scales, *, height: int, width: int):
  """Per-Gaussian (cx, cy, a, b, c, d) with u = a dx + b dy, v = c dy - d dx; each [...] like `rotations`."""
  cx = (means[..., 0] + 1.0) * (0.5 * width)
  cy = (means[..., 1] + 1.0) * (0.5 * height)
  cos, sin = jnp.cos(rotations), jnp.sin(rotations)
  # diag(1/s) R^T: rotate the offset into the Gaussian's axes, then scale each axis.
  inv_sx, inv_sy = 1.0 / scales[..., 0], 1.0 / scales[..., 1]
  return cx, cy, cos * inv_sx, sin * inv_sx, cos * inv_sy, sin * inv_sy


def gaussian_tile(rows, px, py, cutoff: float):
  """Weights and the intermediates the backward needs, for broadcastable Gaussian rows and pixel centres.

  Args:
    rows: (cx, cy, a, b, c, d) from `geometry`, each shaped to broadcast against `px` (e.g. [K, 1]).
    px, py: pixel centres (e.g. [1, P]).
    cutoff: weights below it are set to 0.

  Returns:
    (w, u, v, dx, dy), each of the broadcast shape; `w` is already zeroed below the cutoff.
  """
  cx, cy, a, b, c, d = rows
  dx = px - cx
  dy = py - cy
  u = a * dx + b * dy
  v = c * dy - d * dx
  w = jnp.exp(-0.5 * (u * u + v * v))
  return jnp.where(w >= cutoff, w, 0.0), u, v, dx, dy


def _centre_of(p, width: int):
  """(px, py): the centre of row-major pixel p (int32, any shape, a scalar too), float32."""
  return (p % width).astype(jnp.float32) + 0.5, (p // width).astype(jnp.float32) + 0.5


def pixel_centres(height: int, width: int):
  """(px, py), each [height * width] float32, pixels in row-major order."""
  return _centre_of(jnp.arange(height * width, dtype=jnp.int32), width)


def _image_splat(rows, features, *, height: int, width: int, cutoff: float):
  """[H*W, C] splat of one image: its Gaussians' `geometry` rows (each [K]) and features [K, C]."""
  px, py = pixel_centres(height, width)
  w = gaussian_tile([r[:, None] for r in rows], px[None, :], py[None, :], cutoff)[0]  # [K, H*W]
  return jnp.einsum("kp,kc->pc", w, features, precision=jax.lax.Precision.HIGHEST)


def splat_xla(means, rotations, scales, features, *, height: int, width: int, cutoff: float):
  """Dense XLA path: float32 [B, H, W, C]; builds a [K, H*W] weight matrix per image (vmapped)."""

  def one_image(m, r, s, f):
    rows = geometry(m, r, s, height=height, width=width)
    return _image_splat(rows, f, height=height, width=width, cutoff=cutoff).reshape(height, width, -1)

  return jax.vmap(one_image)(means, rotations, scales, features)


def _round_up(n: int, m: int) -> int:
  return pl.cdiv(n, m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: Gaussians (block_k) and pixels (block_p) per tile; channels are padded to block_c.

  The other fields are the GPU kernels' alone (unused on TPU): num_warps per program, num_stages of Triton's
  software pipelining; tf32x3, which runs the kernels' products on the tensor cores as three TF32 products
  (`lax.DotAlgorithmPreset.TF32_TF32_F32_X3`, near float32 accuracy) instead of IEEE float32 FMA dots; and
  scalar_loops, which swaps the tiles for loops (`_forward_loop_kernel`, `_backward_loop_kernel`): a thread per
  pixel (forward) or per Gaussian (backward) looping over the other axis with scalar loads, so that nothing goes
  through shared memory, where the H200 profile of the tiles found their time (docs/benchmarks.md); meant for few
  channels (the loops run over the real C; block_c need only be a power of 2 >= C) and not yet timed on a GPU.
  cull_rows skips the tiles that no Gaussian reaches. Each Gaussian's weight is below the cutoff outside a band of
  pixel rows (`_row_spans`), so the forward loops only over the Gaussian blocks that reach its pixel block and the
  backward only over the pixel blocks that its Gaussian block reaches (`_block_ranges`), the Gaussians sorted by
  centre row first so that those ranges are short. Trained Gaussians are small (the demo checkpoint's bands are
  about 6 rows; docs/benchmarks.md), so most tiles of a large map are empty; not yet timed on a GPU either. The
  defaults are the H200 sweeps' winners: 64 Gaussians to a tile with TF32x3 products took forward+backward, the op
  the train step runs, from 0.201 to 0.161-0.188 ms at the ImageNet shape, 0.076 to 0.051 at the CIFAR one and 4.03
  to 2.49 at the large one, within 3.2e-7 of the XLA path. Summing the backward's geometry terms once per program
  instead of once per pixel block, and 3 pipeline stages, were no faster. The interpreter computes every product in
  float32 whatever tf32x3 says (XLA:CPU has no TF32).

  Passed as `block_sizes` to this module's `splat`; the model's splat (`gaussiantoken_jax.splat`) takes the
  tiles of `for_shape`, so culling and the other variants are reached from here only.

  GPU (Triton): every tile dimension a power of 2 and the matmul operands at least 16 wide, so channels pad
  to max(16, next power of 2). TPU (Mosaic): the last two dimensions of a block in multiples of (8, 128);
  Gaussians and pixels sit on the 128-lane axis, channels on the 8-row sublane axis.
  """
  block_k: int
  block_p: int
  block_c: int
  num_warps: int = 4
  num_stages: int = 2
  tf32x3: bool = True
  scalar_loops: bool = False
  cull_rows: bool = False

  def __post_init__(self):
    # Checked here, not by the lowering: the interpreter runs any size, so a bad one would pass on the CPU.
    for name in ("block_k", "block_p", "block_c", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"BlockSizes: `{name}` must be a positive int, got {value!r}.")
      if name != "num_stages" and value & (value - 1):
        raise ValueError(f"BlockSizes: `{name}` must be a power of 2 (Triton's tiles and warps), got {value}.")
    if self.scalar_loops and self.cull_rows:
      raise ValueError("BlockSizes: cull_rows applies to the tile kernels only; the scalar loops do not cull "
                       "(got scalar_loops=True and cull_rows=True).")

  @classmethod
  def for_shape(cls, num_gaussians: int, num_pixels: int, channels: int, backend: str) -> BlockSizes:
    if backend == "tpu":
      return cls(block_k=128, block_p=128 if num_pixels <= 128 else 256, block_c=8)
    channels_p2 = max(16, pl.next_power_of_2(channels))
    # Few Gaussians take a smaller tile so that padding does not dominate; small maps a smaller pixel tile so
    # that a batch still fills the GPU.
    block_k = 64 if num_gaussians > 32 else (32 if num_gaussians > 16 else 16)
    return cls(block_k=block_k, block_p=64 if num_pixels > 256 else 32, block_c=channels_p2)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static description of one call: map size, cutoff, padded sizes, kernel choice."""
  height: int
  width: int
  num_gaussians: int
  channels: int
  cutoff: float
  padded_k: int
  padded_c: int
  blocks: BlockSizes
  backend: str
  interpret: bool
  backward_pass_impl: str

  @property
  def num_pixels(self) -> int:
    return self.height * self.width

  @property
  def padded_p(self) -> int:
    # cull_rows: one more block, which a loop starting at any row can read into (`_block_ranges`).
    return _round_up(self.num_pixels, self.blocks.block_p) + (self.blocks.block_p if self.blocks.cull_rows else 0)


def _core_xla(layout: _Layout, geom, feats):
  """The kernels' contract in jnp: geom [B, 8, Kp], feats [B, Kp, Cp] -> [B, Pp, Cp] (padded pixels 0)."""
  splat_one = functools.partial(_image_splat, height=layout.height, width=layout.width, cutoff=layout.cutoff)
  out = jax.vmap(lambda g, f: splat_one(tuple(g[:6]), f))(geom, feats)
  return jnp.pad(out, ((0, 0), (0, layout.padded_p - layout.num_pixels), (0, 0)))


# The row bands of `_row_spans` are widened by this fraction plus this many pixels, far more than the float32
# rounding of the kernels' u^2 + v^2 and exp can move a weight across the cutoff (a few 1e-7 relative).
_SPAN_SLACK = 1e-3


def _row_spans(geom, layout: _Layout):
  """First and last pixel row where each Gaussian's weight can reach the cutoff: int32 [B, Kp] each.

  w >= cutoff means u^2 + v^2 <= rho^2 with rho^2 = -2 ln(cutoff), an ellipse in (dx, dy). (u, v) = M (dx, dy)
  with M = [[a, b], [-d, c]], so over the ellipse |dy| <= rho sqrt((M^-1 M^-T)_yy) = rho sqrt(a^2 + d^2) / |ac + bd|.
  Row i (centre i + 0.5) can then carry weight only if |i + 0.5 - cy| is within that half-height. Empty bands
  (lo > hi): padded Gaussians and those wholly above or below the map; a non-finite band (NaN geometry, a zero
  cutoff) spans every row, as the dense kernel would compute them.
  """
  cy, a, b, c, d = (geom[:, r] for r in range(1, 6))
  rho = jnp.sqrt(-2.0 * jnp.log(jnp.float32(layout.cutoff)))
  half = rho * jnp.sqrt(a * a + d * d) / jnp.abs(a * c + b * d)
  half = half * (1.0 + _SPAN_SLACK) + _SPAN_SLACK
  last_row = layout.height - 1
  lo = jnp.nan_to_num(jnp.clip(jnp.ceil(cy - half - 0.5), 0, layout.height), nan=0.0)
  hi = jnp.nan_to_num(jnp.clip(jnp.floor(cy + half - 0.5), -1, last_row), nan=last_row)
  real = jnp.arange(geom.shape[-1]) < layout.num_gaussians
  return jnp.where(real, lo, layout.height).astype(jnp.int32), jnp.where(real, hi, -1).astype(jnp.int32)


def _block_ranges(geom, layout: _Layout):
  """The tiles `cull_rows` computes: per program, where its loop starts and how many blocks it runs (int32, ..., 2).

  forward  [B, Pp/bp, 2]: from the first Gaussian whose band meets the pixel block's rows, enough blocks of
           Gaussians to pass the last one (any order of the Gaussians is correct; sorted by centre row the range
           is short);
  backward [B, Kp/bk, 2]: from the first pixel of the first row under the Gaussian block's bands, enough blocks
           of pixels to pass the last such row.
  The loops start on any Gaussian or pixel, not on a block boundary, which on trained-size Gaussians saves a third
  of the forward's tiles (docs/benchmarks.md); the extra block of `padded_k` and `padded_p` keeps their last
  reads in bounds. An empty range is (0, 0): the program writes zeros, what its Gaussians or pixels get.
  """
  lo, hi = _row_spans(geom, layout)
  b, kp = lo.shape
  bk, bp, width = layout.blocks.block_k, layout.blocks.block_p, layout.width
  first_pixel = jnp.arange(layout.padded_p // bp) * bp
  top, bottom = first_pixel // width, jnp.minimum((first_pixel + bp - 1) // width, layout.height - 1)
  meets = (lo[:, None, :] <= bottom[None, :, None]) & (hi[:, None, :] >= top[None, :, None])  # [B, nP, Kp]
  first_k = jnp.argmax(meets, axis=-1)
  stop_k = kp - jnp.argmax(meets[..., ::-1], axis=-1)
  any_k = jnp.any(meets, axis=-1)
  forward = jnp.stack([jnp.where(any_k, first_k, 0), jnp.where(any_k, pl.cdiv(stop_k - first_k, bk), 0)], axis=-1)
  block_lo, block_hi = lo.reshape(b, kp // bk, bk).min(-1), hi.reshape(b, kp // bk, bk).max(-1)
  any_p = block_lo <= block_hi
  first_p = block_lo * width
  backward = jnp.stack([jnp.where(any_p, first_p, 0),
                        jnp.where(any_p, pl.cdiv((block_hi + 1) * width - first_p, bp), 0)], axis=-1)
  return forward.astype(jnp.int32), backward.astype(jnp.int32)


def _block_loop(ranges_ref, num_blocks: int, block: int):
  """(offset, count): a kernel's loop runs `count` blocks, block i starting at element offset(i).

  Under cull_rows the program's range (`_block_ranges`): any start; else every block, at aligned starts.
  """
  if not ranges_ref:
    return lambda i: pl.multiple_of(i * block, block), num_blocks
  first = ranges_ref[0][0]
  return lambda i: first + i * block, ranges_ref[0][1]


def gpu_kernels_available() -> bool:
  return pltriton is not None


def _pixel_block(p0, shape, axis, width: int):
  """Centres (px, py) of the pixels p0 + [0, block) laid along `axis` of `shape`."""
  return _centre_of(p0 + jax.lax.broadcasted_iota(jnp.int32, shape, axis), width)


def _dot_precision(layout: _Layout):
  if layout.blocks.tf32x3 and not layout.interpret:
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return jax.lax.Precision.HIGHEST


def _forward_kernel(geom_ref, feats_ref, *refs, layout: _Layout):
  """One image, one block of pixels: out[P, C] = sum over K blocks of w[P, Kb] @ feats[Kb, C].

  refs: (out_ref,), or (ranges_ref, out_ref) under cull_rows, which limits the loop to the Gaussians that reach.
  """
  *ranges_ref, out_ref = refs
  bk, bp = layout.blocks.block_k, layout.blocks.block_p
  px, py = _pixel_block(pl.program_id(1) * bp, (bp, 1), 0, layout.width)

  offset, count = _block_loop(ranges_ref, layout.padded_k // bk, bk)

  def body(i, acc):
    ks = pl.ds(offset(i), bk)
    rows = [geom_ref[r, ks][None, :] for r in range(6)]
    w = gaussian_tile(rows, px, py, layout.cutoff)[0]  # [P, Kb]
    return acc + jnp.dot(w, feats_ref[ks, :], precision=_dot_precision(layout))

  out_ref[...] = jax.lax.fori_loop(0, count, body, jnp.zeros((bp, layout.padded_c), jnp.float32))


def _geometry_terms(w, u, v, dx, dy, dw):
  """The six per-pair terms whose sums over pixels give the geometry gradients (`_geometry_grads`)."""
  a = w * dw
  au, av = a * u, a * v
  return au, av, au * dx, au * dy, av * dy, av * dx


def _geometry_grads(rows, sums):
  """Gradients of the six `geometry` numbers from their rows and the pixel sums of `_geometry_terms`.

  With a = w * dL/dw (w after the cutoff, whose mask passes through), dL/du = -a u and dL/dv = -a v, and
  u = a_ dx + b dy, v = c dy - d dx, dx = px - cx, dy = py - cy give
  dcx = a_ S(a u) - d S(a v), dcy = b S(a u) + c S(a v), da_ = -S(a u dx), db = -S(a u dy),
  dc = -S(a v dy), dd = S(a v dx), with S the sum over pixels.
  """
  _, _, a_, b, c, d = rows
  s_au, s_av, s_audx, s_audy, s_avdy, s_avdx = sums
  return a_ * s_au - d * s_av, b * s_au + c * s_av, -s_audx, -s_audy, -s_avdy, s_avdx


def _backward_kernel(geom_ref, feats_ref, cot_ref, *refs, layout: _Layout):
  """One image, one block of Gaussians: loops over pixel blocks, so each program owns its sums (no atomics).

  refs: (dgeom_ref, dfeats_ref), after a ranges_ref under cull_rows (the pixels the Gaussians reach).
  """
  *ranges_ref, dgeom_ref, dfeats_ref = refs
  bk, bp = layout.blocks.block_k, layout.blocks.block_p
  rows = [geom_ref[r, :][:, None] for r in range(6)]  # [Kb, 1]
  feats = feats_ref[...]
  precision = _dot_precision(layout)
  offset, count = _block_loop(ranges_ref, layout.padded_p // bp, bp)

  def body(j, carry):
    dfeats, sums = carry
    p0 = offset(j)
    px, py = _pixel_block(p0, (1, bp), 1, layout.width)
    # Padded pixels get weights too, but their cotangent is 0 (the transpose of the output slice).
    w, u, v, dx, dy = gaussian_tile(rows, px, py, layout.cutoff)  # [Kb, P]
    cot = cot_ref[pl.ds(p0, bp), :]  # [P, C]
    dw = jax.lax.dot_general(feats, cot, (((1,), (1,)), ((), ())), precision=precision)  # [Kb, P]
    dfeats = dfeats + jnp.dot(w, cot, precision=precision)
    new = _geometry_terms(w, u, v, dx, dy, dw)
    return dfeats, tuple(s + jnp.sum(t, axis=1) for s, t in zip(sums, new))

  zeros = jnp.zeros((bk,), jnp.float32)
  dfeats, sums = jax.lax.fori_loop(
      0, count, body, (jnp.zeros((bk, layout.padded_c), jnp.float32), (zeros,) * 6))
  for r, g in enumerate(_geometry_grads([r[:, 0] for r in rows], sums) + (zeros, zeros)):
    dgeom_ref[r, :] = g
  dfeats_ref[...] = dfeats


def _forward_loop_kernel(geom_ref, feats_ref, out_t_ref, *, layout: _Layout):
  """One image, one block of pixels, a pixel per thread: out^T[c, P] summed over the Gaussians one at a time,
  each Gaussian's six numbers and C features scalar loads, so there is no dot and no cross-thread sum."""
  bp = layout.blocks.block_p
  px, py = _pixel_block(pl.program_id(1) * bp, (bp,), 0, layout.width)

  def body(k, acc):
    w = gaussian_tile([geom_ref[r, k] for r in range(6)], px, py, layout.cutoff)[0]  # [P]
    return tuple(a + w * feats_ref[k, c] for c, a in enumerate(acc))

  acc = jax.lax.fori_loop(0, layout.padded_k, body, (jnp.zeros((bp,), jnp.float32),) * layout.channels)
  for c in range(layout.padded_c):
    out_t_ref[c, :] = acc[c] if c < layout.channels else jnp.zeros((bp,), jnp.float32)


def _backward_loop_kernel(geom_ref, feats_t_ref, cot_ref, sums_ref, dfeats_t_ref, *, layout: _Layout):
  """One image, one block of Gaussians (a Gaussian per thread), one block of pixels, looped over one pixel at a
  time with the pixel's C cotangents as scalar loads: this block's sums over its pixels of the six geometry terms
  (rows 0-5 of sums_ref) and of the feature gradient (dfeats_t_ref, [C, Kb]), kept per thread, so there is no
  dot and no cross-thread sum. The caller adds the pixel blocks' partial sums (a second, deterministic stage)."""
  bk, bp = layout.blocks.block_k, layout.blocks.block_p
  rows = [geom_ref[r, :] for r in range(6)]  # [Kb]
  feats = [feats_t_ref[c, :] for c in range(layout.channels)]  # [Kb]
  p0 = pl.program_id(2) * bp

  def body(j, carry):
    dfeats, sums = carry
    px, py = _centre_of(p0 + j, layout.width)
    w, u, v, dx, dy = gaussian_tile(rows, px, py, layout.cutoff)  # [Kb]
    cot = [cot_ref[j, c] for c in range(layout.channels)]  # the padded pixels' are 0: they add nothing
    dw = sum(f * g for f, g in zip(feats, cot))
    new = _geometry_terms(w, u, v, dx, dy, dw)
    return tuple(d + w * g for d, g in zip(dfeats, cot)), tuple(s + t for s, t in zip(sums, new))

  zeros = jnp.zeros((bk,), jnp.float32)
  dfeats, sums = jax.lax.fori_loop(0, bp, body, ((zeros,) * layout.channels, (zeros,) * 6))
  for r, t in enumerate(sums + (zeros, zeros)):
    sums_ref[r, :] = t
  for c in range(layout.padded_c):
    dfeats_t_ref[c, :] = dfeats[c] if c < layout.channels else zeros


def _gpu_params(layout: _Layout):
  """Triton's launch parameters; none for the interpreter, which then runs without the Triton module."""
  if layout.interpret:
    return None
  return pltriton.CompilerParams(num_warps=layout.blocks.num_warps, num_stages=layout.blocks.num_stages)


def _gpu_forward(geom, feats, layout: _Layout):
  b = geom.shape[0]
  kp, cp, bp = layout.padded_k, layout.padded_c, layout.blocks.block_p
  if layout.blocks.scalar_loops:
    out_t = pl.pallas_call(
        functools.partial(_forward_loop_kernel, layout=layout),
        grid=(b, layout.padded_p // bp),
        in_specs=[pl.BlockSpec((None, NUM_GEOMETRY_ROWS, kp), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, kp, cp), lambda i, j: (i, 0, 0))],
        out_specs=pl.BlockSpec((None, cp, bp), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((b, cp, layout.padded_p), jnp.float32),
        compiler_params=_gpu_params(layout), interpret=layout.interpret, name="splat_forward_loops",
    )(geom, feats)
    return out_t.transpose(0, 2, 1)
  in_specs = [pl.BlockSpec((None, NUM_GEOMETRY_ROWS, kp), lambda i, j: (i, 0, 0)),
              pl.BlockSpec((None, kp, cp), lambda i, j: (i, 0, 0))]
  ranges = []
  if layout.blocks.cull_rows:
    ranges = [_block_ranges(geom, layout)[0]]
    in_specs.append(pl.BlockSpec((None, None, 2), lambda i, j: (i, j, 0)))
  return pl.pallas_call(
      functools.partial(_forward_kernel, layout=layout),
      grid=(b, layout.padded_p // bp),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bp, cp), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, layout.padded_p, cp), jnp.float32),
      compiler_params=_gpu_params(layout), interpret=layout.interpret, name="splat_forward",
  )(geom, feats, *ranges)


def _gpu_backward(geom, feats, cotangent, layout: _Layout):
  b = geom.shape[0]
  kp, cp, pp, bk = layout.padded_k, layout.padded_c, layout.padded_p, layout.blocks.block_k
  if layout.blocks.scalar_loops:
    bp = layout.blocks.block_p
    num_p = pp // bp
    sums, dfeats_t = pl.pallas_call(
        functools.partial(_backward_loop_kernel, layout=layout),
        grid=(b, kp // bk, num_p),
        in_specs=[pl.BlockSpec((None, NUM_GEOMETRY_ROWS, bk), lambda i, j, l: (i, 0, j)),
                  pl.BlockSpec((None, cp, bk), lambda i, j, l: (i, 0, j)),
                  pl.BlockSpec((None, bp, cp), lambda i, j, l: (i, l, 0))],
        out_specs=[pl.BlockSpec((None, None, NUM_GEOMETRY_ROWS, bk), lambda i, j, l: (i, l, 0, j)),
                   pl.BlockSpec((None, None, cp, bk), lambda i, j, l: (i, l, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((b, num_p, NUM_GEOMETRY_ROWS, kp), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_p, cp, kp), jnp.float32)],
        compiler_params=_gpu_params(layout), interpret=layout.interpret, name="splat_backward_loops",
    )(geom, feats.transpose(0, 2, 1), cotangent)
    sums = jnp.sum(sums, axis=1)  # [B, 8, Kp]: the pixel blocks' partial sums, in a fixed order
    grads = _geometry_grads([geom[:, r] for r in range(6)], [sums[:, r] for r in range(6)])
    dgeom = jnp.pad(jnp.stack(grads, axis=1), ((0, 0), (0, NUM_GEOMETRY_ROWS - 6), (0, 0)))
    return dgeom, jnp.sum(dfeats_t, axis=1).transpose(0, 2, 1)
  in_specs = [pl.BlockSpec((None, NUM_GEOMETRY_ROWS, bk), lambda i, j: (i, 0, j)),
              pl.BlockSpec((None, bk, cp), lambda i, j: (i, j, 0)),
              pl.BlockSpec((None, pp, cp), lambda i, j: (i, 0, 0))]
  ranges = []
  if layout.blocks.cull_rows:
    ranges = [_block_ranges(geom, layout)[1]]
    in_specs.append(pl.BlockSpec((None, None, 2), lambda i, j: (i, j, 0)))
  return pl.pallas_call(
      functools.partial(_backward_kernel, layout=layout),
      grid=(b, kp // bk),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, NUM_GEOMETRY_ROWS, bk), lambda i, j: (i, 0, j)),
                 pl.BlockSpec((None, bk, cp), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(geom.shape, jnp.float32), jax.ShapeDtypeStruct(feats.shape, jnp.float32)],
      compiler_params=_gpu_params(layout), interpret=layout.interpret, name="splat_backward",
  )(geom, feats, cotangent, *ranges)


def _forward(geom, feats, layout: _Layout):
  if layout.backend == "tpu":
    from pallas_kernels import splat_tpu  # pylint: disable=import-outside-toplevel  # it imports this module
    return splat_tpu.forward(geom, feats, layout)
  return _gpu_forward(geom, feats, layout)


def _backward(geom, feats, cotangent, layout: _Layout):
  if layout.backend == "tpu":
    from pallas_kernels import splat_tpu  # pylint: disable=import-outside-toplevel  # it imports this module
    return splat_tpu.backward(geom, feats, cotangent, layout)
  return _gpu_backward(geom, feats, cotangent, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(layout: _Layout, geom, feats):
  return _forward(geom, feats, layout)


def _core_fwd(layout, geom, feats):
  return _core(layout, geom, feats), (geom, feats)


def _core_bwd(layout, residuals, cotangent):
  geom, feats = residuals
  if layout.backward_pass_impl == "xla":
    return jax.vjp(functools.partial(_core_xla, layout), geom, feats)[1](cotangent)
  return _backward(geom, feats, cotangent, layout)


_core.defvjp(_core_fwd, _core_bwd)


def _operands(means, rotations, scales, features, *, height, width, cutoff, backend, interpret,
              backward_pass_impl, block_sizes):
  """(layout, geom [B, 8, Kp], feats [B, Kp, Cp]): the options checked, the kernels' padded layout."""
  if backend not in BACKENDS:
    raise ValueError(f"splat: `backend` must be one of {BACKENDS}, got {backend!r}.")
  if backward_pass_impl not in BACKWARD_PASS_IMPLS:
    raise ValueError(f"splat: `backward_pass_impl` must be one of {BACKWARD_PASS_IMPLS}, "
                     f"got {backward_pass_impl!r}.")
  means, rotations, scales, features = (jnp.asarray(a, jnp.float32)
                                        for a in (means, rotations, scales, features))
  _, k, c = features.shape
  blocks = block_sizes or BlockSizes.for_shape(k, height * width, c, backend)
  if backend == "tpu" and blocks.cull_rows:
    raise ValueError(f"splat: cull_rows is a GPU kernel option; the TPU kernel computes every tile, got {blocks}.")
  layout = _Layout(height=height, width=width, num_gaussians=k, channels=c, cutoff=float(cutoff),
                   padded_k=_round_up(k, blocks.block_k) + (blocks.block_k if blocks.cull_rows else 0),
                   padded_c=_round_up(c, blocks.block_c), blocks=blocks, backend=backend,
                   interpret=interpret, backward_pass_impl=backward_pass_impl)
  geom = jnp.stack(geometry(means, rotations, scales, height=height, width=width), axis=1)  # [B, 6, K]
  if blocks.cull_rows:
    # The Gaussians in order of centre row, so that those reaching a pixel block are close together (the
    # output is a sum over them; autodiff of the gather puts the gradients back in the caller's order).
    order = jnp.argsort(geom[:, 1], axis=-1)
    geom = jnp.take_along_axis(geom, order[:, None, :], axis=2)
    features = jnp.take_along_axis(features, order[:, :, None], axis=1)
  # Padded Gaussians carry zero features, so they add nothing; their gradients are sliced away.
  geom = jnp.pad(geom, ((0, 0), (0, NUM_GEOMETRY_ROWS - 6), (0, layout.padded_k - k)))
  feats = jnp.pad(features, ((0, 0), (0, layout.padded_k - k), (0, layout.padded_c - c)))
  return layout, geom, feats


def splat(means, rotations, scales, features, *, height: int, width: int, cutoff: float, backend: str = "gpu",
          interpret: bool = False, backward_pass_impl: str = "pallas", block_sizes: BlockSizes | None = None):
  """Pallas splat: [B, K, 2], [B, K], [B, K, 2], [B, K, C] -> float32 [B, height, width, C].

  Differentiable in all four arrays in reverse mode (a `custom_vjp`: no jvp). No argument checks beyond the options
  (gaussiantoken_jax.splat checks shapes and dtypes); inputs are cast to float32.

  Args:
    means, rotations, scales, features: as in gaussiantoken_jax.splat.
    height, width: output map size.
    cutoff: weights below it are set to 0.
    backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU) kernel variant.
    interpret: run the kernels through the Pallas interpreter (any platform).
    backward_pass_impl: "pallas" (kernel) or "xla" (autodiff of the jnp definition on the same layout).
    block_sizes: tile sizes; default `BlockSizes.for_shape`.
  """
  layout, geom, feats = _operands(means, rotations, scales, features, height=height, width=width, cutoff=cutoff,
                                  backend=backend, interpret=interpret, backward_pass_impl=backward_pass_impl,
                                  block_sizes=block_sizes)
  out = _core(layout, geom, feats)
  return out[:, :height * width, :layout.channels].reshape(-1, height, width, layout.channels)


def computed_tile_fraction(means, rotations, scales, *, height: int, width: int, cutoff: float,
                           block_sizes: BlockSizes | None = None):
  """(forward, backward): the fraction of the [Gaussian block x pixel block] tiles each GPU kernel computes.

  1.0 for each without `cull_rows` (the default tile has none); under it, what the row bands of these Gaussians
  leave (`_block_ranges`). For benchmarks and tests: how much work culling saves on given geometry.
  """
  features = jnp.zeros(jnp.shape(means)[:-1] + (1,), jnp.float32)
  layout, geom, _ = _operands(means, rotations, scales, features, height=height, width=width, cutoff=cutoff,
                              backend="gpu", interpret=True, backward_pass_impl="pallas", block_sizes=block_sizes)
  blocks = layout.blocks
  if not blocks.cull_rows:
    return 1.0, 1.0
  num_k, num_p = pl.cdiv(layout.num_gaussians, blocks.block_k), pl.cdiv(layout.num_pixels, blocks.block_p)
  forward, backward = (jnp.sum(r[..., 1]) for r in _block_ranges(geom, layout))  # the dense kernels': num_k * num_p
  dense = geom.shape[0] * num_k * num_p
  return float(forward / dense), float(backward / dense)
