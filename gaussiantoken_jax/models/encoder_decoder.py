"""Convolutional encoder and decoder (Open-MAGVIT2 style, as in the GaussianToken reference code).

Encoder: conv_in -> per level `num_res_blocks` ResBlocks (+ a stride-2 conv after every level but the last)
-> `num_res_blocks` mid ResBlocks -> GroupNorm -> swish -> 1x1 conv. No attention anywhere.
Decoder: conv_in -> mid ResBlocks -> per level from the top down: AdaptiveGroupNorm conditioned on the decoder
input, ResBlocks, and (above level 0) a conv + depth-to-space x2 upsampler -> GroupNorm -> swish -> 3x3 conv.

Layout is NHWC. Parameters are float32; `dtype` is the compute dtype of the convolutions and so also the dtype
of the residual stream between them: with bfloat16, the convolutions and ResBlocks return bfloat16 (except a
ResBlock without a shortcut conv right after an AdaGN, whose float32 input promotes the sum to float32). GroupNorm
and the AdaGN statistics always run in float32 (bfloat16 group statistics over a 256x256 map lose too many
bits), and the modules return float32 so that the float32 embedder, quantizer and losses downstream see no
bfloat16.

Initialisation follows PyTorch's defaults (what the reference trains from): kernels and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Parameter names follow the reference's state-dict names (conv_in,
down_{level}_block_{i}, mid_block_{i}, adaptive_{level}, up_{level}_upsample, norm_out, conv_out), which keeps a
converter for the released PyTorch checkpoints a matter of renaming and transposing.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaussiantoken_jax import xla_options
from gaussiantoken_jax.checks import check_nhwc
from gaussiantoken_jax.models.conv import Conv

# Both GroupNorm variants (plain and adaptive) use the reference's epsilon; AdaGN also adds it to the variance of
# its conditioning map before the square root.
GROUP_NORM_EPS = 1e-6

# PyTorch's default Conv2d / Linear kernel init, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default Conv2d / Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Flax bias initialisers do not see the kernel's fan-in, so the caller passes it.
  """
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _check_fields(where: str, ch: int, ch_mult: Sequence[int], num_res_blocks: int, num_groups: int) -> None:
  if not ch_mult or any(int(m) < 1 for m in ch_mult):
    raise ValueError(f"{where}: `ch_mult` must be a non-empty sequence of positive ints, got {ch_mult!r}.")
  if num_res_blocks < 1:
    raise ValueError(f"{where}: `num_res_blocks` must be >= 1, got {num_res_blocks}.")
  for width in sorted({ch * int(m) for m in ch_mult}):
    if width % num_groups:
      raise ValueError(f"{where}: `num_groups` ({num_groups}) must divide every level's channel count "
                       f"ch * ch_mult = {width}.")


def _conv(features: int, kernel: int, *, in_channels: int, use_bias: bool, dtype: Any, name: str,
          strides: int = 1) -> nn.Conv:
  """A Conv (`models.conv.Conv`) with PyTorch's padding (k // 2 on each side) and PyTorch's default init.

  Explicit padding matters for the stride-2 downsampler: "SAME" would pad (0, 1) there and shift the grid.
  """
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
              use_bias=use_bias, dtype=dtype, kernel_init=torch_default_kernel_init,
              bias_init=torch_default_bias_init(kernel * kernel * in_channels), name=name)


def _group_mean(v: jax.Array, num_groups: int) -> jax.Array:
  """[B, P, C] -> the mean over P and each group's C / G channels, per channel: [B, 1, C]."""
  batch, positions, channels = v.shape
  group_size = channels // num_groups
  if xla_options.platform() == "cpu":
    # Per-channel sums over P (a reduction along a major axis, vectorised over the channels), then per group.
    sums = jnp.sum(jnp.sum(v, axis=1).reshape(batch, num_groups, group_size), axis=-1)
  else:  # one reduction, as nn.GroupNorm does
    sums = jnp.sum(v.reshape(batch, positions, num_groups, group_size), axis=(1, 3))
  return jnp.repeat(sums / (positions * group_size), group_size, axis=1)[:, None, :]


class GroupNorm(nn.Module):
  """nn.GroupNorm(epsilon=GROUP_NORM_EPS, use_fast_variance=False, dtype=float32) on NHWC maps, in float32.

  The same parameters ("scale" ones and "bias" zeros, [C], when used) and the same formula, (x - mean) *
  (rsqrt(var + eps) * scale) + bias with the two-pass variance mean((x - mean)^2) (E[x^2] - E[x]^2 cancels badly
  on activations with a large mean). On the CPU the group statistics are per-channel sums over H*W followed by
  sums over each group's channels: XLA:CPU runs nn.GroupNorm's single reduction over axes (1, 3) of
  [B, H*W, G, C/G] about 2x slower forward and 1.5x slower forward + backward (CIFAR shapes, with the swish
  that follows). The sums are the same up to float32 rounding (tests/test_encoder_decoder.py).
  """
  num_groups: int = 32
  use_scale: bool = True
  use_bias: bool = True
  swish: bool = False  # swish(GroupNorm(x)) (`_norm_swish`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = x.astype(jnp.float32).reshape(batch, height * width, channels)
    centred = x - _group_mean(x, self.num_groups)
    multiplier = jax.lax.rsqrt(_group_mean(jnp.square(centred), self.num_groups) + GROUP_NORM_EPS)
    if self.use_scale:
      multiplier = multiplier * self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    y = centred * multiplier
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    if self.swish:
      y = nn.swish(y)
    return y.reshape(batch, height, width, channels)


_RematGroupNorm = nn.remat(GroupNorm)


def _norm_swish(num_groups: int, remat: bool, name: str) -> nn.Module:
  """swish(GroupNorm(x)); with `remat`, recomputed in the backward pass from its input instead of saved.

  Autodiff saves GroupNorm + swish's float32 intermediates (the input cast to float32, the centred map, the
  normalised map, its sigmoid): several times the bytes of the input, which is all that `nn.remat` keeps
  (bfloat16 under bfloat16 convolutions). That costs the recomputation: on 2 CPU cores the float32 CIFAR step
  took 4% longer with it; on the 256-pixel ImageNet model it cuts what the backward keeps 3.6x
  (docs/benchmarks.md). Same parameters, names and results either way.
  """
  return (_RematGroupNorm if remat else GroupNorm)(num_groups, swish=True, name=name)


def depth_to_space(x: jax.Array, block_size: int) -> jax.Array:
  """[B, H, W, s*s*C] -> [B, H*s, W*s, C] in DCR order: channel index = (block_y * s + block_x) * C + c.

  DCR is the order of the reference's (and ONNX's default) depth-to-space, so ported upsampler weights keep
  their meaning: out[b, h*s + by, w*s + bx, c] = x[b, h, w, (by*s + bx)*C + c].
  """
  if x.ndim != 4 or x.shape[-1] % (block_size * block_size):
    raise ValueError(f"depth_to_space: `x` must be [B, H, W, C] with C a multiple of block_size**2 = "
                     f"{block_size * block_size}, got shape {tuple(x.shape)}.")
  b, h, w, c = x.shape
  c_out = c // (block_size * block_size)
  x = x.reshape(b, h, w, block_size, block_size, c_out)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H, by, W, bx, C]
  return x.reshape(b, h * block_size, w * block_size, c_out)


class ResBlock(nn.Module):
  """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus x (through a 1x1 conv when channels change).

  Convolutions have no bias (each is followed by a GroupNorm that would cancel it); no dropout. `remat_norms`:
  see `_norm_swish`.
  """
  out_channels: int
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat_norms: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    h = _norm_swish(self.num_groups, self.remat_norms, "norm1")(x)
    h = _conv(self.out_channels, 3, in_channels=in_channels, use_bias=False, dtype=self.dtype, name="conv1")(h)
    h = _norm_swish(self.num_groups, self.remat_norms, "norm2")(h)
    h = _conv(self.out_channels, 3, in_channels=self.out_channels, use_bias=False, dtype=self.dtype,
              name="conv2")(h)
    if in_channels != self.out_channels:
      x = _conv(self.out_channels, 1, in_channels=in_channels, use_bias=False, dtype=self.dtype,
                name="nin_shortcut")(x)
    return x + h


class AdaptiveGroupNorm(nn.Module):
  """gamma(style) * GroupNorm_noaffine(x) + beta(style), conditioned on a second NHWC map.

  gamma = Dense(per-channel spatial std of `style`, computed as sqrt(unbiased var + eps)) and
  beta = Dense(per-channel spatial mean of `style`): the decoder feeds its own input (the splatted z-map) as
  the style at every level. All of it runs in float32.
  """
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
    channels, style_channels = x.shape[-1], style.shape[-1]
    style = style.astype(jnp.float32)
    # Unbiased (N - 1), as the reference's `Tensor.var(dim=-1)`, whose default correction is 1 despite its
    # "#not unbias" comment (improved_model.py, AdaptiveGroupNorm.forward).
    style_std = jnp.sqrt(jnp.var(style, axis=(1, 2), ddof=1) + GROUP_NORM_EPS)  # [B, z]
    style_mean = jnp.mean(style, axis=(1, 2))  # [B, z]
    dense = functools.partial(nn.Dense, channels, kernel_init=torch_default_kernel_init,
                              bias_init=torch_default_bias_init(style_channels))
    gamma = dense(name="gamma")(style_std)[:, None, None, :]
    beta = dense(name="beta")(style_mean)[:, None, None, :]
    normed = GroupNorm(self.num_groups, use_scale=False, use_bias=False, name="norm")(x)
    return gamma * normed + beta


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> features [B, H / 2**(L-1), W / 2**(L-1), out_channels] (L = len(ch_mult)).

  Reference settings: GaussianToken CIFAR ch_mult (1, 2) and ImageNet (1, 2, 2, 4) with out_channels 64 (the
  embedder width D'); the plain-VQ baseline adds a level in front and outputs z channels.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 4
  out_channels: int = 64
  in_channels: int = 3
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat_norms: bool = False  # `_norm_swish`

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    _check_fields("Encoder", self.ch, self.ch_mult, self.num_res_blocks, self.num_groups)
    num_levels = len(self.ch_mult)
    check_nhwc("Encoder", "images", images, channels=self.in_channels, spatial_divisor=2 ** (num_levels - 1))
    h = _conv(self.ch, 3, in_channels=self.in_channels, use_bias=False, dtype=self.dtype, name="conv_in")(images)
    for level, mult in enumerate(self.ch_mult):
      width = self.ch * mult
      for i in range(self.num_res_blocks):
        h = ResBlock(width, self.num_groups, self.dtype, self.remat_norms, name=f"down_{level}_block_{i}")(h)
      if level < num_levels - 1:
        h = _conv(width, 3, strides=2, in_channels=width, use_bias=True, dtype=self.dtype,
                  name=f"down_{level}_downsample")(h)
    width = self.ch * self.ch_mult[-1]
    for i in range(self.num_res_blocks):
      h = ResBlock(width, self.num_groups, self.dtype, self.remat_norms, name=f"mid_block_{i}")(h)
    h = _norm_swish(self.num_groups, self.remat_norms, "norm_out")(h)
    h = _conv(self.out_channels, 1, in_channels=width, use_bias=True, dtype=self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)


class Decoder(nn.Module):
  """Maps [B, h, w, z_channels] -> images [B, h * 2**(L-1), w * 2**(L-1), out_channels], no output activation.

  Every level's AdaptiveGroupNorm is conditioned on the decoder input itself. Channel flow for CIFAR
  (ch_mult (1, 2)): 16x16@256 -> mid -> AdaGN@256 -> blocks@256 -> up -> 32x32@256 -> AdaGN@256 -> blocks
  (256 -> 128) -> 3, i.e. each AdaGN sees the channel count of the level above it.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 4
  out_channels: int = 3
  # The decoder input's channel count (z); None accepts any (the parameters then fix it at init).
  z_channels: int | None = None
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat_norms: bool = False  # `_norm_swish`

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    _check_fields("Decoder", self.ch, self.ch_mult, self.num_res_blocks, self.num_groups)
    check_nhwc("Decoder", "z", z, channels=self.z_channels)
    width = self.ch * self.ch_mult[-1]
    h = _conv(width, 3, in_channels=z.shape[-1], use_bias=True, dtype=self.dtype, name="conv_in")(z)
    for i in range(self.num_res_blocks):
      h = ResBlock(width, self.num_groups, self.dtype, self.remat_norms, name=f"mid_block_{i}")(h)
    for level in reversed(range(len(self.ch_mult))):
      h = AdaptiveGroupNorm(self.num_groups, name=f"adaptive_{level}")(h, z)
      width = self.ch * self.ch_mult[level]
      for i in range(self.num_res_blocks):
        h = ResBlock(width, self.num_groups, self.dtype, self.remat_norms, name=f"up_{level}_block_{i}")(h)
      if level > 0:
        h = _conv(4 * width, 3, in_channels=width, use_bias=True, dtype=self.dtype,
                  name=f"up_{level}_upsample")(h)
        h = depth_to_space(h, 2)
    h = _norm_swish(self.num_groups, self.remat_norms, "norm_out")(h)
    h = _conv(self.out_channels, 3, in_channels=width, use_bias=True, dtype=self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)
