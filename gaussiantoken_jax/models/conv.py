"""Convolutions in the form each backend runs well: `Conv`, a drop-in `nn.Conv` for every conv of the project.

On XLA:CPU a convolution whose kernel window covers more positions than the map it slides over (the
discriminator's 4x4 kernels on its 4x4 and 3x3 maps, VGG16's block 5 on the 2x2 maps of 32-pixel LPIPS inputs)
is rewritten by XLA's algebraic simplifier with its two operands swapped (`SwapConvOperands`: kernel
h*w > unpadded input h*w; the padded size does not matter), and that form runs as a slow loop: 86-92 ms each
on a quiet 2-core machine (docs/benchmarks.md), 0.3-0.5 s on a loaded one, where the same product as im2col + dot takes
1-5 ms. A backward pass runs two more convolutions per layer, so the condition is checked on all three:
  forward          window kh*kw  over the input map   h*w,
  input gradient   window kh*kw  over the output map  oh*ow (the output gradient with the flipped kernel),
  kernel gradient  window oh*ow  over the input map   h*w.
When any window is larger than its map, `conv_general_dilated` computes the convolution as im2col + dot
(padded input sliced into kh*kw shifted views, one dot with the kernel reshaped to [kh*kw*C_in, C_out]); its
autodiff is slices, pads and dots, so no convolution is left for the simplifier to swap. Everywhere else, and
on every backend but the CPU, it is `lax.conv_general_dilated` unchanged: the slow loop is XLA:CPU's, GPU and
TPU hand convolutions to their own emitters and libraries (not measured on a GPU or TPU).

Inside a loop body (`lax.scan`, `fori_loop`) XLA:CPU has a second weak spot: it runs a convolution with its fast
library kernels (YNNPACK's by default, Eigen's with the project's options, `xla_options`) only when the kernel is
laid out HWIO, and the input gradient that JAX's autodiff emits is a convolution with the flipped kernel read as
HWOI. At a program's top level layout assignment turns that kernel around; inside a while body it does not, and
XLA's generic convolution runs instead. So every other stride-1 convolution on the CPU goes through
`_stride1_conv`, whose `custom_vjp` computes the input gradient with the flipped kernel transposed to HWIO by an
explicit op (the kernel gradient is autodiff's). Measured (`benchmarks/conv_backward_bench.py`, 2 CPU cores): 10
input-gradient steps of a 3x3 128-channel convolution on 8 32x32 maps in a `lax.scan` took 971 ms with
autodiff's form, 306 ms with this one, 286-320 ms unrolled either way, and 892 against 250 ms with the project's
options (docs/benchmarks.md); this is what lets `geometry_fit` run its steps as a loop. A `custom_vjp` has no
forward-mode rule: on the CPU, `jax.jvp` and `jacfwd` through these convolutions fail (nothing in the project uses
them).

The choice is made at trace time from static shapes and `xla_options.platform()`; parameters (names, shapes,
init) are nn.Conv's own, so checkpoints do not change. im2col + dot, and the explicit input gradient, sum the same
products in another order: results equal the plain convolution to float32 rounding (tests/test_conv.py).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gaussiantoken_jax import xla_options

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def window_exceeds_map(kernel_hw: Sequence[int], input_hw: Sequence[int], output_hw: Sequence[int]) -> bool:
  """Whether XLA would swap the operands of the forward, input-gradient or kernel-gradient convolution."""
  kernel, inputs, outputs = math.prod(kernel_hw), math.prod(input_hw), math.prod(output_hw)
  return kernel > inputs or kernel > outputs or outputs > inputs


def im2col_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                padding: Sequence[tuple[int, int]], *, precision=None, preferred_element_type=None) -> jax.Array:
  """NHWC x HWIO convolution (explicit padding, no dilation, one group) as im2col + one dot."""
  kh, kw, c_in, c_out = rhs.shape
  sh, sw = window_strides
  padded = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  batch, height, width, _ = padded.shape
  oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
  # patches[b, y, x, (i * kw + j) * c_in + c] = padded[b, y * sh + i, x * sw + j, c], the order of rhs's HWI axes.
  patches = jnp.stack([padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                       for i in range(kh) for j in range(kw)], axis=3).reshape(batch, oh, ow, kh * kw * c_in)
  return lax.dot_general(patches, rhs.reshape(kh * kw * c_in, c_out), (((3,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=preferred_element_type)


def _simple_cpu_conv(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                     batch_group_count) -> bool:
  """On the CPU, NHWC x HWIO, explicit non-negative padding, no dilation, one group: the forms below apply."""
  if xla_options.platform() != "cpu" or lhs.ndim != 4 or isinstance(padding, str) \
     or any(p < 0 for pair in padding for p in pair):
    return False
  if feature_group_count != 1 or batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or (1, 1))) \
     or any(d != 1 for d in (rhs_dilation or (1, 1))):
    return False
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC


def _im2col_applies(lhs, rhs, window_strides, padding) -> bool:
  (kh, kw), (h, w) = rhs.shape[:2], lhs.shape[1:3]
  out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip((h, w), padding, (kh, kw), window_strides)]
  return min(out) >= 1 and window_exceeds_map((kh, kw), (h, w), out)


def _stride1_applies(lhs, rhs, window_strides, padding, preferred_element_type) -> bool:
  return tuple(window_strides) == (1, 1) and preferred_element_type is None and lhs.dtype == rhs.dtype \
      and all(p <= k - 1 for k, pair in zip(rhs.shape[:2], padding) for p in pair)


def _plain_stride1(lhs, rhs, padding, precision):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stride1_conv(lhs, rhs, padding, precision):
  """NHWC x HWIO stride-1 convolution whose input gradient keeps its kernel HWIO (module docstring)."""
  return _plain_stride1(lhs, rhs, padding, precision)


def _stride1_conv_fwd(lhs, rhs, padding, precision):
  return _plain_stride1(lhs, rhs, padding, precision), (lhs, rhs)


def _stride1_conv_bwd(padding, precision, residuals, cotangent):
  lhs, rhs = residuals
  kh, kw = rhs.shape[:2]
  # The input gradient is the cotangent convolved with the kernel flipped in space and with its in / out axes
  # swapped, padded by k - 1 - p on each side (which gives back the input's size).
  flipped = jnp.transpose(rhs[::-1, ::-1], (0, 1, 3, 2))
  pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))
  d_lhs = _plain_stride1(cotangent, flipped, pads, precision)
  d_rhs = jax.vjp(lambda w: _plain_stride1(lhs, w, padding, precision), rhs)[1](cotangent)[0]
  return d_lhs, d_rhs


_stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated`, computed on the CPU as im2col + dot where a window exceeds its map, and with an
  HWIO input gradient for the other stride-1 convolutions (module docstring)."""
  if _simple_cpu_conv(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                      batch_group_count):
    if _im2col_applies(lhs, rhs, window_strides, padding):
      return im2col_conv(lhs, rhs, window_strides, padding, precision=precision,
                         preferred_element_type=preferred_element_type)
    if _stride1_applies(lhs, rhs, window_strides, padding, preferred_element_type):
      return _stride1_conv(lhs, rhs, tuple(tuple(pair) for pair in padding), precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)


# nn.Conv with the convolution above; same parameters as nn.Conv.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
