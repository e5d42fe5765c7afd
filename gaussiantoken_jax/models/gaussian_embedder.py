"""The Gaussian embedder: an encoder feature map -> K featured 2D Gaussians (the reference code's
`gstk/modules/gaussianembed/gaussian_embed.py`).

Forward order (D' = `embed_dim`):
  1. feature-map lifter: 1x1 projection + GroupNorm -> image tokens [B, h*w, D'], and a DETR sine position
     embedding of the pixel centres;
  2. Gaussian lifter: learnable anchors [K, 5 + D'] shared by the batch and frozen zero instance features;
  3. deformable self-attention encoder over the image tokens (post-norm layers) -> memory;
  4. `num_blocks` blocks of [cross_attn, ffn, refine]. Each embeds the current anchors with the shared
     AnchorEncoder, lets the instance features attend to each other and (deformably) to the memory around the
     anchors' centres, and refines the anchors: centre residually in logit space, everything else replaced;
  5. output activations of the last refinement: means in (-1, 1), rotations in (0, pi), scales in
     [scale_min, scale_max] feature pixels, features of size z (`feature_dim`): the feature head's output plus
     (`centre_feature`) a linear read of the memory sampled bilinearly at the Gaussian's centre.

Anchor layout, everywhere from init on: [x, y (0:2) | rotation (2) | scale x, y (3:5) | feature (5:)], all in
pre-activation (logit) space. The reference initialises the scale values in slots 2:4 and the zero rotation in
slot 4 while every consumer reads the layout above (its rotation/scale slots are swapped for the first anchor
embedding only); we initialise in the layout that is read.

Initial parameters: the reference deep-copies one freshly built module per op, so the `num_blocks` blocks, the
layers inside each cross-attention decoder and the self-attention encoder's layers all START IDENTICAL (and
then train apart). Here each of those stacks is an `_IdenticalInitStack`: parameters are stacked on a leading
axis (blocks: [num_blocks, ...]; decoder layers: [num_blocks, num_decoder_layers, ...]) and initialised from one
draw, while each copy gets its own dropout draws.

Initialisers as in the reference: PyTorch's default Linear init (kernel and bias U(+-1/sqrt(fan_in))) in the
anchor encoder, the asymmetric FFN, the refinement MLP and the feature head; xavier with zero bias in the
attention layers and the lifter; xavier kernels in the transformer layers' MLPs, whose biases start at zero
where the reference's keep PyTorch's default (not chosen; docs/differences.md). One deliberate difference
(docs/differences.md): the refinement head's scale outputs start at the bias that gives `initial_scale`
(1 feature pixel) instead of ~2-3 pixels, which on 2-pixel centre spacing made every Gaussian overlap about ten
others and stalled the start of training (docs/training.md, "Why GaussianToken did not learn").

Two further deliberate differences make the embedder learn on varied data (docs/differences.md; measured in
docs/training.md, "What made the embedder learn"), each switchable back to the reference:
  * `centre_feature`: the feature also reads the memory at the Gaussian's own centre through one linear layer.
    In the reference the only route from the image to a feature runs through the blocks and two 4-layer MLP
    trunks; on a stream of crops that route learned so slowly that the features stayed nearly input-independent
    (7-8 dB under the same splat and decoder fed from the encoder map). The direct read gives every feature its
    local image content from the first step, and the blocks learn a correction on top.
  * `grid_anchors`: the initial centres lie on a regular sqrt(K) x sqrt(K) grid of cell centres instead of
    random-uniform points, which leave holes in the map that no Gaussian covers.

Only the last refinement's `to_features` head is built: the reference builds one per block but uses only the
last, so our trainable parameter count is that of the parameters the reference actually uses (0.756M for
K = 64, z = 3 against the reference's 0.790M with the two unused heads).

Variable collections: "params", and "range_scheduler" {"scale_max", "scale_mean"}: the annealed upper end of
the scale range and the running mean of the produced scales that drives it (see `GaussianEmbedder`).
RNG stream: "dropout", used only when `train=True`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gaussiantoken_jax.checks import check_float_array
from gaussiantoken_jax.models.deformable_attention import DeformableAttention, bilinear_sample
from gaussiantoken_jax.models.encoder_decoder import torch_default_bias_init, torch_default_kernel_init

_XAVIER = nn.initializers.xavier_uniform()
_NORM_EPS = 1e-5  # PyTorch's LayerNorm / GroupNorm default
_POSITION_TEMPERATURE = 10000.0
_ANCHOR_LOGIT_EPS = 1e-4  # the anchor init draws logit(clip(U(0, 1), eps, 1 - eps))
_MEAN_LOGIT_CLAMP = 9.21  # ~ logit(0.9999): keeps the means' sigmoid away from saturation


@flax.struct.dataclass
class Gaussians:
  """K featured 2D Gaussians per image (the splat op's arguments).

  Attributes:
    means: [B, K, 2] centres in (-1, 1); index 0 is x (columns), index 1 is y (rows).
    rotations: [B, K] angles in radians, in (0, pi).
    scales: [B, K, 2] standard deviations along the Gaussian's own axes, in feature-map pixels.
    features: [B, K, z] the vectors the Gaussians carry (quantized downstream).
  """
  means: jax.Array
  rotations: jax.Array
  scales: jax.Array
  features: jax.Array


def sine_position_embedding(height: int, width: int, dim: int) -> jax.Array:
  """DETR's normalised sine position embedding of the pixel centres: [height, width, dim] float32.

  Each axis gets dim/2 channels. A pixel's coordinate along an axis of length n is (i + 0.5) / (n + 1e-6) * 2pi
  (DETR's cumsum - 0.5, normalised); channel pair (2j, 2j+1) holds (sin, cos) of it divided by
  10000^(2j / (dim/2)). The channels are [y part | x part].
  """
  if dim % 4:
    raise ValueError(f"sine_position_embedding: `dim` must be divisible by 4 (sin/cos pairs per axis), got {dim}.")
  axis_dim = dim // 2
  frequencies = _POSITION_TEMPERATURE ** (-2.0 * jnp.arange(axis_dim // 2, dtype=jnp.float32) / axis_dim)

  def embed_axis(n: int) -> jax.Array:  # [n, axis_dim], sin and cos interleaved
    coords = (jnp.arange(n, dtype=jnp.float32) + 0.5) / (n + 1e-6) * (2.0 * math.pi)
    angles = coords[:, None] * frequencies
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(n, axis_dim)

  pos_y = jnp.broadcast_to(embed_axis(height)[:, None, :], (height, width, axis_dim))
  pos_x = jnp.broadcast_to(embed_axis(width)[None, :, :], (height, width, axis_dim))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def pixel_centres(height: int, width: int) -> jax.Array:
  """Normalised (x, y) centres of the pixels in row-major order: [height * width, 2]."""
  cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  return jnp.stack(jnp.meshgrid(cols, rows, indexing="xy"), axis=-1).reshape(height * width, 2)


def _logit(p: jax.Array) -> jax.Array:
  p = jnp.clip(p, _ANCHOR_LOGIT_EPS, 1.0 - _ANCHOR_LOGIT_EPS)
  return jnp.log(p) - jnp.log1p(-p)


def grid_cell_centres(num_anchors: int) -> jax.Array:
  """Normalised (x, y) centres of a sqrt(K) x sqrt(K) grid's cells, row-major: [K, 2]; K must be a square."""
  side = math.isqrt(num_anchors)
  if side * side != num_anchors:
    raise ValueError(f"grid anchors need a square number of Gaussians (4, 16, 64, 256, ...), got {num_anchors}; "
                     "set model.embedder.grid_anchors=False for random centres.")
  return pixel_centres(side, side)


def anchor_init(key, shape, dtype=jnp.float32, *, grid: bool = False):
  """Initial anchors [K, 5 + D'] in logit space: centres random-uniform (or, with `grid`, the cells of a square
  grid), scales random-uniform, rotation 0, features N(0, 1)."""
  num_anchors, anchor_dim = shape
  key_xy, key_scale, key_feature = jax.random.split(key, 3)

  def logit_uniform(k, n):
    return _logit(jax.random.uniform(k, (num_anchors, n)))

  anchors = jnp.concatenate([
      _logit(grid_cell_centres(num_anchors)) if grid else logit_uniform(key_xy, 2),
      jnp.zeros((num_anchors, 1)),
      logit_uniform(key_scale, 2),
      jax.random.normal(key_feature, (num_anchors, anchor_dim - 5)),
  ], axis=-1)
  return anchors.astype(dtype)


def _torch_linear(x: jax.Array, features: int, name: str | None = None, bias_init=None) -> jax.Array:
  """A Dense layer with PyTorch's default Linear init (kernel and bias U(+-1/sqrt(fan_in))).

  The reference re-initialises only its transformer layers (xavier kernels; the attention modules zero their
  biases, the MLPs keep PyTorch's default ones) and its lifter (xavier / zero bias); the anchor encoder, the
  asymmetric FFN, the refinement MLP and the feature head keep PyTorch's default, which makes their initial
  outputs (and Adam's first relative updates) smaller than xavier's by about 1.7x.
  """
  return nn.Dense(features, kernel_init=torch_default_kernel_init,
                  bias_init=bias_init or torch_default_bias_init(x.shape[-1]), name=name)(x)


class _IdenticalInitStack(nn.Module):
  """`length` copies of `layer_cls(*layer_args)` applied in sequence, parameters stacked on axis 0 and
  initialised identically (the reference's deep copies of one freshly built module).

  The layer's `__call__` takes the carry plus arguments shared by all copies and returns the new carry; each
  copy gets its own dropout draws. A Python loop over the copies rather than `nn.scan`: the stacks are 1-3 layers
  deep, and XLA:CPU runs the unrolled program faster than a while loop (22% of the embedder's forward + backward
  at the demo size), and a loop is quicker to trace than nested scans under `jax.grad`: a fresh process traced the
  demo train step in 2.6-2.95 s against 3.5-3.6 s (docs/benchmarks.md, "The test suite").
  """
  layer_cls: Any
  length: int
  layer_args: tuple

  @nn.compact
  def __call__(self, carry, *shared):
    if self.length == 0:
      # No parameters at all: zero-size stacked arrays would be params a checkpoint cannot save (Orbax refuses
      # them), e.g. with `num_encoder_layers=0`.
      return carry
    layer = self.layer_cls(*self.layer_args, parent=None)
    if self.is_initializing():
      rngs = {"params": self.make_rng("params")}
      if self.has_rng("dropout"):
        rngs["dropout"] = self.make_rng("dropout")
      one_copy = layer.init(rngs, carry, *shared)["params"]
      for name, subtree in one_copy.items():
        self.param(name, lambda _, tree=subtree: jax.tree.map(
            lambda p: jnp.broadcast_to(p, (self.length, *p.shape)), tree))
    stacked = self.variables["params"]
    dropout_key = self.make_rng("dropout") if self.has_rng("dropout") else None
    for i in range(self.length):
      rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
      # lax rather than p[i]: jnp indexing goes through its gather logic for each of the stack's hundreds of
      # leaves; under cProfile that slicing took 1.2 s of the demo train step's trace.
      copy_i = jax.tree.map(lambda p, i=i: jax.lax.index_in_dim(p, i, keepdims=False), stacked)
      carry = layer.apply({"params": copy_i}, carry, *shared, rngs=rngs)
    return carry


class _ReluNormMLP(nn.Module):
  """`num_layers` x [Linear -> ReLU -> LayerNorm], the AnchorEncoder's unit."""
  features: int
  num_layers: int = 2

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_layers):
      x = nn.LayerNorm(epsilon=_NORM_EPS)(nn.relu(_torch_linear(x, self.features)))
    return x


class AnchorEncoder(nn.Module):
  """Anchors [..., 5 + D'] -> embeddings [..., dim]: one MLP per anchor part, summed, then one more MLP."""
  dim: int

  @nn.compact
  def __call__(self, anchors):
    parts = {"xy": anchors[..., 0:2], "rotation": anchors[..., 2:3], "scale": anchors[..., 3:5],
             "feature": anchors[..., 5:]}
    embedded = sum(_ReluNormMLP(self.dim, name=f"{name}_embed")(part) for name, part in parts.items())
    return _ReluNormMLP(self.dim, name="output")(embedded)


class _RefineTrunk(nn.Module):
  """2 x [Linear -> ReLU -> Linear -> ReLU -> LayerNorm], shared shape of the refinement and feature heads."""
  dim: int

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.relu(_torch_linear(x, self.dim))
      x = nn.relu(_torch_linear(x, self.dim))
      x = nn.LayerNorm(epsilon=_NORM_EPS)(x)
    return x


class _ScaledHead(nn.Module):
  """Trunk -> Linear(out_dim) -> learnable per-dimension scale (init 1).

  `scale_logit`, when given, initialises the output bias of the scale slots 3:5 (the refinement head): the
  initial Gaussians then have scale_min + (scale_max - scale_min) * sigmoid(scale_logit) feature pixels.
  """
  dim: int
  out_dim: int
  scale_logit: float | None = None

  @nn.compact
  def __call__(self, x):
    x = _RefineTrunk(self.dim)(x)
    bias_init = torch_default_bias_init(x.shape[-1])
    if self.scale_logit is not None:
      default_init = bias_init
      bias_init = lambda key, shape, dtype=jnp.float32: default_init(key, shape, dtype).at[3:5].set(self.scale_logit)
    x = _torch_linear(x, self.out_dim, bias_init=bias_init)
    return x * self.param("scale", nn.initializers.ones, (self.out_dim,))


class _FeedForward(nn.Module):
  """Post-norm residual MLP of a transformer layer: LN(x + Drop(Linear(Drop(ReLU(Linear(x)))))).

  Xavier kernels as in the reference, but zero biases where the reference's keep PyTorch's default
  U(+-1/sqrt(fan_in)) (its `_reset_parameters` skips 1-d parameters; not chosen, docs/differences.md).
  """
  dim: int
  hidden_dim: int
  dropout: float
  train: bool

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.hidden_dim, kernel_init=_XAVIER)(x))
    h = nn.Dropout(self.dropout, deterministic=not self.train)(h)
    h = nn.Dense(self.dim, kernel_init=_XAVIER)(h)
    h = nn.Dropout(self.dropout, deterministic=not self.train)(h)
    return nn.LayerNorm(epsilon=_NORM_EPS)(x + h)


class _GaussianSelfAttention(nn.Module):
  """Multi-head self-attention among the Gaussians (PyTorch nn.MultiheadAttention semantics).

  The q/k/v projections are one [dim, 3 dim] xavier-uniform kernel as in PyTorch, so their initial scale
  matches the reference's in_proj (a per-projection xavier would be sqrt(2) wider). Queries and keys see the
  positional embedding, values do not. Dropout acts on the attention probabilities.
  """
  dim: int
  num_heads: int
  dropout: float
  train: bool

  @nn.compact
  def __call__(self, query_key, value):
    batch, length, _ = value.shape
    head_dim = self.dim // self.num_heads
    kernel = self.param("in_proj_kernel", _XAVIER, (self.dim, 3 * self.dim))
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * self.dim,))
    q, k, v = (
        (x @ kernel[:, i * self.dim:(i + 1) * self.dim] + bias[i * self.dim:(i + 1) * self.dim])
        .reshape(batch, length, self.num_heads, head_dim)
        for i, x in enumerate((query_key, query_key, value)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    probs = nn.Dropout(self.dropout, deterministic=not self.train)(jax.nn.softmax(logits, axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, self.dim)
    return nn.Dense(self.dim, kernel_init=_XAVIER, name="out_proj")(out)


class _AttentionLayer(nn.Module):
  """The sizes shared by the encoder and decoder layers."""
  dim: int
  num_heads: int
  num_points: int
  mlp_dim: int
  dropout: float
  spatial_shape: tuple[int, int]
  train: bool


class _EncoderLayer(_AttentionLayer):
  """Deformable self-attention over the image tokens + MLP, post-norm (Deformable-DETR encoder layer)."""

  @nn.compact
  def __call__(self, src, pos, reference_points):
    attended = DeformableAttention(self.dim, self.num_heads, self.num_points, name="self_attn")(
        src + pos, reference_points, src, self.spatial_shape)
    src = nn.LayerNorm(epsilon=_NORM_EPS)(src + nn.Dropout(self.dropout, deterministic=not self.train)(attended))
    return _FeedForward(self.dim, self.mlp_dim, self.dropout, self.train, name="mlp")(src)


class _DecoderLayer(_AttentionLayer):
  """Self-attention among the Gaussians, deformable cross-attention into the memory, MLP; all post-norm."""

  @nn.compact
  def __call__(self, tgt, query_pos, reference_points, memory):
    drop = nn.Dropout(self.dropout, deterministic=not self.train)
    attended = _GaussianSelfAttention(self.dim, self.num_heads, self.dropout, self.train, name="self_attn")(
        tgt + query_pos, tgt)
    tgt = nn.LayerNorm(epsilon=_NORM_EPS)(tgt + drop(attended))
    attended = DeformableAttention(self.dim, self.num_heads, self.num_points, name="cross_attn")(
        tgt + query_pos, reference_points, memory, self.spatial_shape)
    tgt = nn.LayerNorm(epsilon=_NORM_EPS)(tgt + drop(attended))
    return _FeedForward(self.dim, self.mlp_dim, self.dropout, self.train, name="mlp")(tgt)


class _AsymmetricFFN(nn.Module):
  """LN, then Linear(2D -> D) plus a Linear -> ReLU -> Linear branch; no output norm, no dropout."""
  dim: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=_NORM_EPS)(x)
    branch = _torch_linear(nn.relu(_torch_linear(x, self.hidden_dim)), self.dim)
    return _torch_linear(x, self.dim, name="identity_fc") + branch


class _Block(nn.Module):
  """One embedder block: [cross_attn, ffn, refine] on carry (instance features [B, K, D], anchors [B, K, 5+D])."""
  dim: int
  num_heads: int
  num_points: int
  num_decoder_layers: int
  mlp_dim: int
  ffn_dim: int
  dropout: float
  spatial_shape: tuple[int, int]
  train: bool
  scale_logit: float | None

  @nn.compact
  def __call__(self, carry, memory, anchor_encoder_params):
    instance, anchors = carry
    # The AnchorEncoder is ONE module shared by all blocks, so it cannot live in this stacked (per-block
    # parameters) module; its parameters come in as a broadcast argument instead.
    anchor_embed = AnchorEncoder(self.dim, parent=None).apply({"params": anchor_encoder_params}, anchors)
    reference_points = jax.nn.sigmoid(anchors[..., :2])

    decoded = _IdenticalInitStack(_DecoderLayer, self.num_decoder_layers, (
        self.dim, self.num_heads, self.num_points, self.mlp_dim, self.dropout, self.spatial_shape, self.train),
        name="cross_attn")(instance, anchor_embed, reference_points, memory)
    decoded = nn.Dropout(self.dropout, deterministic=not self.train)(decoded)
    instance = _AsymmetricFFN(self.dim, self.ffn_dim, name="ffn")(jnp.concatenate([decoded, instance], axis=-1))

    # Refinement: the centre moves residually in logit space; rotation, scale and feature are replaced.
    update = _ScaledHead(self.dim, anchors.shape[-1], self.scale_logit, name="refine")(instance + anchor_embed)
    anchors = jnp.concatenate([anchors[..., :2] + update[..., :2], update[..., 2:]], axis=-1)
    return instance, anchors


class GaussianEmbedder(nn.Module):
  """Encoder feature map [B, h, w, embed_dim] -> `Gaussians` (K per image, z-dimensional features).

  Scale range schedule ("range_scheduler" collection): scales are scale_min + (scale_max - scale_min) *
  sigmoid(.), with scale_max starting at `scale_max_init`. On a training call with the collection mutable,
  AFTER computing this call's scales with the current scale_max:
    scale_mean <- scale_ema_momentum * mean(scales) + (1 - scale_ema_momentum) * scale_mean
    if scale_max > scale_max_final:
      scale_max <- max(scale_max - scale_decay_rate * max(scale_mean - (scale_max + scale_min) / 2,
                                                          scale_min_decay_gap), scale_max_final)
  mean(scales) is over the whole (global) batch, where the reference's DDP replicas each used their own.
  Unlike the reference, scale_mean is saved too, so a resumed run continues exactly.

  `initial_scale` (feature pixels, in (scale_min, scale_max_init)) sets the refinement head's initial scale
  bias; None keeps the reference's init. `centre_feature` and `grid_anchors`: see the module docstring (False,
  False is the reference).
  """
  num_gaussians: int
  feature_dim: int
  embed_dim: int = 64
  num_heads: int = 4
  num_points: int = 4
  num_blocks: int = 3
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  mlp_dim: int = 256
  ffn_dim: int = 256
  dropout: float = 0.1
  num_groups: int = 32
  scale_min: float = 0.1
  scale_max_init: float = 4.0
  initial_scale: float | None = 1.0
  scale_max_final: float = 3.0
  scale_ema_init: float = 2.05
  scale_ema_momentum: float = 0.01
  scale_decay_rate: float = 1e-3
  scale_min_decay_gap: float = 0.01
  centre_feature: bool = True
  grid_anchors: bool = True

  @nn.compact
  def __call__(self, feature_map: jax.Array, *, train: bool) -> Gaussians:
    """feature_map [B, h, w, embed_dim] (any float dtype; float32 inside) -> Gaussians (float32)."""
    check_float_array("GaussianEmbedder", "feature_map", feature_map, f"[B, h, w, {self.embed_dim}]", 4,
                      last_dim=self.embed_dim)
    batch, height, width, dim = feature_map.shape
    anchor_dim = 5 + dim
    spatial_shape = (height, width)

    # 1. Feature-map lifter: 1x1 projection + GroupNorm -> tokens; sine embedding of the pixel centres.
    src = nn.Dense(dim, kernel_init=_XAVIER, name="input_proj")(feature_map.astype(jnp.float32))
    src = nn.GroupNorm(num_groups=self.num_groups, epsilon=_NORM_EPS, name="input_norm")(src)
    src = src.reshape(batch, height * width, dim)
    pos = sine_position_embedding(height, width, dim).reshape(1, height * width, dim)

    # 2. Gaussian lifter: learnable anchors shared by the batch; the instance features are a constant zero.
    anchors = self.param("anchors", functools.partial(anchor_init, grid=self.grid_anchors),
                         (self.num_gaussians, anchor_dim))
    anchors = jnp.broadcast_to(anchors, (batch, self.num_gaussians, anchor_dim))
    instance = jnp.zeros((batch, self.num_gaussians, dim), jnp.float32)

    # 3. Deformable self-attention encoder over the image tokens, reference points at the pixel centres.
    reference_points = jnp.broadcast_to(pixel_centres(height, width), (batch, height * width, 2))
    memory = _IdenticalInitStack(_EncoderLayer, self.num_encoder_layers, (
        dim, self.num_heads, self.num_points, self.mlp_dim, self.dropout, spatial_shape, train),
        name="encoder")(src, pos, reference_points)

    # 4. The blocks, with the shared AnchorEncoder's parameters held here (see _Block).
    anchor_encoder_params = self.param(
        "anchor_encoder",
        lambda key: AnchorEncoder(dim, parent=None).init(key, jnp.zeros((1, anchor_dim), jnp.float32))["params"])
    _, anchors = _IdenticalInitStack(_Block, self.num_blocks, (
        dim, self.num_heads, self.num_points, self.num_decoder_layers, self.mlp_dim, self.ffn_dim, self.dropout,
        spatial_shape, train, self._initial_scale_logit()), name="blocks")(
            (instance, anchors), memory, anchor_encoder_params)

    # 5. Output activations of the last refinement.
    means = 2.0 * jax.nn.sigmoid(jnp.clip(anchors[..., :2], -_MEAN_LOGIT_CLAMP, _MEAN_LOGIT_CLAMP)) - 1.0
    rotations = jax.nn.sigmoid(anchors[..., 2]) * math.pi
    scale_max = self.variable("range_scheduler", "scale_max", lambda: jnp.asarray(self.scale_max_init, jnp.float32))
    scale_mean = self.variable("range_scheduler", "scale_mean",
                               lambda: jnp.asarray(self.scale_ema_init, jnp.float32))
    scales = self.scale_min + (scale_max.value - self.scale_min) * jax.nn.sigmoid(anchors[..., 3:5])
    features = _ScaledHead(dim, self.feature_dim, name="to_features")(anchors[..., 5:])
    if self.centre_feature:  # what the image holds at each Gaussian's centre (see the module docstring)
      centres = (means + 1.0) / 2.0  # bilinear_sample's [0, 1] convention, the same pixel geometry as the splat
      at_centres = bilinear_sample(memory.reshape(batch, height, width, 1, dim), centres[:, :, None, None, :])
      features = features + nn.Dense(self.feature_dim, kernel_init=_XAVIER, name="centre_to_features")(
          at_centres.reshape(batch, self.num_gaussians, dim))

    if train and self.is_mutable_collection("range_scheduler") and not self.is_initializing():
      self._update_scale_range(scale_max, scale_mean, jax.lax.stop_gradient(jnp.mean(scales)))
    return Gaussians(means=means, rotations=rotations, scales=scales, features=features)

  def _initial_scale_logit(self) -> float | None:
    """Pre-activation that puts the initial scales at `initial_scale` (None: the reference's init)."""
    if self.initial_scale is None:
      return None
    fraction = (self.initial_scale - self.scale_min) / (self.scale_max_init - self.scale_min)
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"GaussianEmbedder: initial_scale must lie strictly between scale_min={self.scale_min} and "
                       f"scale_max_init={self.scale_max_init}, got {self.initial_scale}.")
    return math.log(fraction / (1.0 - fraction))

  def _update_scale_range(self, scale_max, scale_mean, batch_mean_scale) -> None:
    """One step of the reference's RangeScheduler (see the class docstring)."""
    mean = self.scale_ema_momentum * batch_mean_scale + (1.0 - self.scale_ema_momentum) * scale_mean.value
    current = scale_max.value
    decrement = self.scale_decay_rate * jnp.maximum(mean - (current + self.scale_min) / 2.0,
                                                    self.scale_min_decay_gap)
    scale_mean.value = mean
    scale_max.value = jnp.where(current > self.scale_max_final,
                                jnp.maximum(current - decrement, self.scale_max_final), current)
