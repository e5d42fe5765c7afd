"""PatchGAN discriminator (taming-transformers' NLayerDiscriminator, as the reference trains it).

conv4 s2 (bias) -> LeakyReLU, then `n_layers` x [conv4 (no bias) -> BatchNorm -> LeakyReLU] with stride 2 for
all but the last, then conv4 s1 -> 1 logit channel; every conv pads 1 on each side (PyTorch padding=1). With
ndf 64 and 3 layers that is 2.77M parameters and a 2x2 logit map for 32x32 images, 30x30 for 256x256
(the reference's CIFAR setting). The convolutions are `models.conv.Conv` (im2col + dot on the CPU for
the 4x4 kernels on the 4x4 and 3x3 maps of 32-pixel inputs).

Init as taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0. That function
leaves conv biases alone, so the first and last convs keep PyTorch's default bias init.
BatchNorm statistics live in the "batch_stats" collection: apply with `mutable=["batch_stats"]` when
`train=True`. momentum 0.9 and epsilon 1e-5 are PyTorch's BatchNorm2d defaults (its momentum 0.1 weights the
new batch). One difference remains: PyTorch's running variance uses the unbiased batch variance, Flax's the
biased one, a factor N/(N-1) over N = batch x patches, i.e. < 1% from the second layer on.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaussiantoken_jax.checks import check_nhwc
from gaussiantoken_jax.models.conv import Conv
from gaussiantoken_jax.models.encoder_decoder import torch_default_bias_init

_KERNEL = 4
_PAD1 = ((1, 1), (1, 1))
_LEAKY_SLOPE = 0.2


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _output_size(size: int, n_layers: int) -> int:
  """Spatial logit-map size for an input side `size`: n_layers stride-2 convs, then two stride-1 convs."""
  for stride in [2] * n_layers + [1, 1]:
    size = (size + 2 - _KERNEL) // stride + 1
  return size


class PatchDiscriminator(nn.Module):
  """images [B, H, W, in_channels] (in [-1, 1]) -> patch logits [B, h, w, 1], float32.

  `dtype` is the compute dtype of the convolutions; BatchNorm runs in float32 and parameters are float32.
  """
  ndf: int = 64
  n_layers: int = 3
  in_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.n_layers < 1:
      raise ValueError(f"PatchDiscriminator: `n_layers` must be >= 1, got {self.n_layers}.")
    check_nhwc("PatchDiscriminator", "images", images, channels=self.in_channels)
    if min(_output_size(n, self.n_layers) for n in images.shape[1:3]) < 1:
      raise ValueError(f"PatchDiscriminator: `images` of shape {tuple(images.shape)} are too small for "
                       f"n_layers={self.n_layers}: the logit map would be empty.")

    def conv(features, in_features, stride, use_bias, name):
      return Conv(features, (_KERNEL, _KERNEL), strides=(stride, stride), padding=_PAD1, use_bias=use_bias,
                  dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                  bias_init=torch_default_bias_init(_KERNEL * _KERNEL * in_features), name=name)

    h = conv(self.ndf, self.in_channels, 2, True, "conv_0")(images)
    h = nn.leaky_relu(h, _LEAKY_SLOPE)
    width = self.ndf
    for layer in range(1, self.n_layers + 1):
      prev_width, width = width, self.ndf * min(2 ** layer, 8)
      stride = 2 if layer < self.n_layers else 1
      h = conv(width, prev_width, stride, False, f"conv_{layer}")(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                       use_fast_variance=False, scale_init=_bn_scale_init, name=f"norm_{layer}")(
                           h.astype(jnp.float32))
      h = nn.leaky_relu(h, _LEAKY_SLOPE)
    h = conv(1, width, 1, True, f"conv_{self.n_layers + 1}")(h)
    return h.astype(jnp.float32)
