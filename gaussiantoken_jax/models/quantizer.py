"""EMA vector quantizer: k-means init, Laplace-smoothed EMA codebook, dead-code reset, rotation-trick gradient.

This is the quantizer of the reference code (`vq_v2.VectorQuantize`, built on lucidrains'
vector-quantize-pytorch): Euclidean distances, no projection, no l2-normalisation, a single head. The codebook is
not a parameter: it lives in the non-trainable variable collection "codebook" and changes only through its EMA
statistics.

One training step (train=True and "codebook" mutable), in the reference's order:
  1. on the very first step (`initted` False): k-means on the batch sets embed, embed_avg = embed * bins and
     cluster_size = bins (the bin counts of the last Lloyd assignment);
  2. quantize with the codebook as it is now (before this step's EMA);
  3. EMA: cs <- d cs + (1 - d) counts, avg <- d avg + (1 - d) sum_x, embed = avg / smoothed(cs), where
     smoothed(cs) = (cs + eps) / (sum(cs) + N eps) * sum(cs) (Laplace smoothing);
  4. every code whose EMA cluster size is below the threshold is replaced by a random vector of the batch;
     its cluster size is set to the threshold and its avg to threshold * vector.

Multi-device training: under `jax.jit` with the batch sharded over devices, every sum over the batch in
this module (counts, vector sums, k-means statistics) is a sum over the global batch, and the random draws
(k-means seeds, dead-code replacements) pick from the global batch. The statistics are therefore summed
across devices as the reference's all-reduce does, with no axis name needed. (Under `shard_map`/`pmap`,
which see only the local shard, that would not hold; this module is not meant for them.)
"""
from __future__ import annotations

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.special

from gaussiantoken_jax.checks import check_float_array, check_positive_int

GRADIENTS = ("rotation", "straight_through")

# Distance and cluster-sum matmuls run at full float32 precision: the GPU default (TF32, 10-bit mantissa)
# would flip near-tie code assignments and blur the EMA sums.
_HIGHEST = jax.lax.Precision.HIGHEST
# Norms are clamped to this before dividing by them, as vector-quantize-pytorch's `safe_div` does.
_NORM_EPS = 1e-6


@struct.dataclass
class QuantizerOutput:
  """What the quantizer reports besides the quantized vectors.

  Attributes:
    indices: int32 [...], the selected code of every input vector (masked ones included).
    commitment_loss: scalar, mean over unmasked vectors and channels of (sg(q) - x)^2; the caller applies
      the weight (0.25 in the reference).
    perplexity: scalar, exp of the entropy of this batch's code-usage distribution (unmasked vectors).
    usage: scalar, the fraction of codes that at least one unmasked vector of this batch selected.
  """
  indices: jax.Array
  commitment_loss: jax.Array
  perplexity: jax.Array
  usage: jax.Array


def _check_matrix(fn: str, name: str, x, rows: int | None, cols: int | None, layout: str) -> None:
  check_float_array(fn, name, x, layout, 2, last_dim=cols)
  if rows is not None and x.shape[0] != rows:
    raise ValueError(f"{fn}: `{name}` must have shape {layout}, got shape {tuple(x.shape)}.")


def _check_mask(fn: str, mask, shape: tuple[int, ...]) -> None:
  if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
    raise ValueError(f"{fn}: `mask` must be a bool array of shape {shape}, got {type(mask).__name__}.")
  if tuple(mask.shape) != tuple(shape) or mask.dtype != jnp.bool_:
    raise ValueError(f"{fn}: `mask` must be a bool array of shape {tuple(shape)}, "
                     f"got {mask.dtype} of shape {tuple(mask.shape)}.")


def _nearest_code(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
  """Euclidean nearest code of each row: vectors [M, D], codebook [N, D] -> int32 [M]."""
  # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, and ||x||^2 does not move the argmin.
  scores = jnp.sum(codebook * codebook, axis=-1) - 2.0 * jnp.dot(vectors, codebook.T, precision=_HIGHEST)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def _cluster_stats(vectors: jax.Array, weights: jax.Array, indices: jax.Array, num_codes: int):
  """Per-code weight totals [N] and weighted vector sums [N, D] of an assignment."""
  # A one-hot matmul rather than a scatter-add: the distance matrix is [M, N] anyway, and matmuls are
  # deterministic and fast on every backend.
  assignment = jax.nn.one_hot(indices, num_codes, dtype=jnp.float32) * weights[:, None]
  return jnp.sum(assignment, axis=0), jnp.dot(assignment.T, vectors, precision=_HIGHEST)


def kmeans(vectors, initial_centres, *, num_iters: int, valid=None):
  """Lloyd's algorithm with vector-quantize-pytorch's conventions.

  Each iteration assigns every valid vector to its nearest centre and moves every centre that received at
  least one vector to the mean of its vectors; a centre that received none keeps its position.

  Args:
    vectors: [M, D] float samples.
    initial_centres: [N, D] float starting centres.
    num_iters: number of Lloyd iterations, >= 1.
    valid: optional bool [M]; False rows take no part.

  Returns:
    (centres [N, D], bins [N]) float32: the centres after the last update and the vector counts of the
    last assignment (the counts that produced those centres).
  """
  _check_matrix("kmeans", "vectors", vectors, None, None, "[M, D]")
  _check_matrix("kmeans", "initial_centres", initial_centres, None, vectors.shape[1],
                f"[N, {vectors.shape[1]}]")
  if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
    raise ValueError(f"kmeans: `num_iters` must be a positive Python int, got {num_iters!r}.")
  if valid is None:
    valid = jnp.ones(vectors.shape[:1], jnp.bool_)
  _check_mask("kmeans", valid, vectors.shape[:1])
  vectors = jnp.asarray(vectors, jnp.float32)
  weights = valid.astype(jnp.float32)
  num_codes = initial_centres.shape[0]

  def lloyd_step(_, carry):
    centres, _ = carry
    bins, sums = _cluster_stats(vectors, weights, _nearest_code(vectors, centres), num_codes)
    means = sums / jnp.maximum(bins, 1.0)[:, None]
    return jnp.where(bins[:, None] > 0, means, centres), bins

  init = (jnp.asarray(initial_centres, jnp.float32), jnp.zeros((num_codes,), jnp.float32))
  return jax.lax.fori_loop(0, num_iters, lloyd_step, init)


def _sample_row_indices(key: jax.Array, valid: jax.Array, num: int) -> jax.Array:
  """`num` random indices of valid rows: distinct when there are at least `num` valid rows, otherwise
  every valid row in turn (random order), repeated as needed (the reference draws with replacement then,
  which can leave some rows unused and seed duplicate centres). The count of valid rows may be traced."""
  # Valid rows get a uniform priority in [0, 1), invalid ones 2, so a sort puts the valid rows first in a
  # random order; this is a traced-size version of the reference's randperm(num_valid)[:num].
  priority = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
  order = jnp.argsort(priority)
  num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.int32)), 1)
  return order[jnp.arange(num) % num_valid]


def _rotation_trick(x: jax.Array, q: jax.Array) -> jax.Array:
  """Value q, gradient of the rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the
  Rotation Trick", Sec. 4.2) with respect to x.

  q is written as sg(||q|| / ||x|| * R) x, R = I - 2 w w^T + 2 q^ x^T with x^ = x/||x||, q^ = q/||q|| and
  w = (x^ + q^)/||x^ + q^||: the rotation taking x^ to q^ in their common plane. So dL/dx =
  ||q||/||x|| R^T dL/dq. The value returned is q itself (bit for bit), with the gradient of R x attached.
  """
  x_norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  q_norm = jnp.linalg.norm(q, axis=-1, keepdims=True)
  x_hat = x / jnp.maximum(x_norm, _NORM_EPS)
  q_hat = q / jnp.maximum(q_norm, _NORM_EPS)
  w = x_hat + q_hat
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), _NORM_EPS)
  x_hat, q_hat, w = jax.lax.stop_gradient((x_hat, q_hat, w))
  scale = jax.lax.stop_gradient(q_norm / jnp.maximum(x_norm, _NORM_EPS))
  rotated = scale * (x - 2.0 * jnp.sum(x * w, -1, keepdims=True) * w
                     + 2.0 * jnp.sum(x * x_hat, -1, keepdims=True) * q_hat)
  # rotated equals q only up to rounding; adding the exact zero (rotated - sg(rotated)) keeps q's value.
  return jax.lax.stop_gradient(q) + (rotated - jax.lax.stop_gradient(rotated))


def _straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
  """Value q, identity gradient with respect to x (written so that the value is q exactly)."""
  return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


class VectorQuantizer(nn.Module):
  """EMA vector quantizer of the reference (see the module docstring for the training step).

  Variables (collection "codebook", non-trainable): `embed` [N, dim], `embed_avg` [N, dim],
  `cluster_size` [N], `initted` bool scalar. They change only when the module is applied with train=True
  and "codebook" in `mutable`, and never during `init` (so initialising on a dummy batch does not run
  k-means on it); until the first training step the codebook is all zeros. Training calls need the
  "quantizer" RNG stream (k-means seeds, dead-code draws):
  `model.apply(variables, x, train=True, rngs={"quantizer": key}, mutable=["codebook"])`.

  Attributes:
    dim: size of the vectors (z).
    codebook_size: number of codes N.
    decay: EMA decay of the cluster sizes and vector sums.
    eps: Laplace-smoothing constant.
    kmeans_iters: Lloyd iterations of the first training call.
    dead_code_threshold: codes whose EMA cluster size is below this are reset (0 disables the reset).
    gradient: "rotation" (rotation trick, the reference's choice) or "straight_through".
  """
  dim: int
  codebook_size: int = 1024
  decay: float = 0.8
  eps: float = 1e-5
  kmeans_iters: int = 10
  dead_code_threshold: float = 2.0
  gradient: str = "rotation"

  def setup(self):
    self._check_fields()
    shape = (self.codebook_size, self.dim)
    self.embed = self.variable("codebook", "embed", jnp.zeros, shape, jnp.float32)
    self.embed_avg = self.variable("codebook", "embed_avg", jnp.zeros, shape, jnp.float32)
    self.cluster_size = self.variable("codebook", "cluster_size", jnp.zeros, shape[:1], jnp.float32)
    self.initted = self.variable("codebook", "initted", lambda: jnp.array(False))

  def _check_fields(self) -> None:
    for name in ("dim", "codebook_size", "kmeans_iters"):
      check_positive_int("VectorQuantizer", name, getattr(self, name))
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"VectorQuantizer: `decay` must be in [0, 1), got {self.decay!r}.")
    if not self.eps > 0.0:
      raise ValueError(f"VectorQuantizer: `eps` must be positive, got {self.eps!r}.")
    if not self.dead_code_threshold >= 0.0:
      raise ValueError(f"VectorQuantizer: `dead_code_threshold` must be >= 0, got {self.dead_code_threshold!r}.")
    if self.gradient not in GRADIENTS:
      raise ValueError(f"VectorQuantizer: `gradient` must be one of {GRADIENTS}, got {self.gradient!r}.")

  def __call__(self, x, *, train: bool, mask=None):
    """Quantizes the last axis of `x`.

    Args:
      x: float [..., dim]; computed in float32 whatever its dtype.
      train: update the codebook statistics (when "codebook" is mutable and not initialising).
      mask: optional bool [...]; False marks padding: those vectors are still quantized but take no part
        in the statistics, the loss, the EMA update, k-means or the dead-code draws.

    Returns:
      (quantized float32 [..., dim], QuantizerOutput). The value of `quantized` is exactly the selected
      code; its gradient reaches `x` through the rotation trick or the straight-through estimator.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"VectorQuantizer: `x` must be an array of shape [..., {self.dim}], "
                       f"got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[-1] != self.dim:
      raise ValueError(f"VectorQuantizer: `x` must have shape [..., {self.dim}], got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"VectorQuantizer: `x` must be a floating-point array, got dtype {x.dtype}.")
    batch_shape = tuple(x.shape[:-1])
    if mask is not None:
      _check_mask("VectorQuantizer", mask, batch_shape)

    vectors = jnp.asarray(x, jnp.float32).reshape(-1, self.dim)
    valid = jnp.ones(vectors.shape[:1], jnp.bool_) if mask is None else mask.reshape(-1)
    weights = valid.astype(jnp.float32)
    state = (self.embed.value, self.embed_avg.value, self.cluster_size.value)

    update = train and self.is_mutable_collection("codebook") and not self.is_initializing()
    if update:
      init_key, dead_key = jax.random.split(self.make_rng("quantizer"))
      state = jax.lax.cond(self.initted.value, lambda: state,
                           lambda: self._kmeans_init(init_key, vectors, valid))

    codebook = state[0]
    indices = _nearest_code(vectors, codebook)
    codes = codebook[indices]
    counts, sums = _cluster_stats(vectors, weights, indices, self.codebook_size)

    if update:
      new_state = self._replace_dead_codes(dead_key, self._ema_update(state, counts, sums), vectors, valid)
      # A batch with no unmasked vector carries no statistics: leave everything as it was.
      has_data = jnp.any(valid)
      old_state = (self.embed.value, self.embed_avg.value, self.cluster_size.value)
      new_state = [jnp.where(has_data, new, old) for new, old in zip(new_state, old_state)]
      self.embed.value, self.embed_avg.value, self.cluster_size.value = new_state
      self.initted.value = self.initted.value | has_data

    num_valid = jnp.maximum(jnp.sum(weights), 1.0)
    commitment_loss = jnp.sum(weights[:, None] * (jax.lax.stop_gradient(codes) - vectors) ** 2) / (
        num_valid * self.dim)
    probs = counts / num_valid
    output = QuantizerOutput(
        indices=indices.reshape(batch_shape),
        commitment_loss=commitment_loss,
        perplexity=jnp.exp(jnp.sum(jax.scipy.special.entr(probs))),
        usage=jnp.mean((counts > 0).astype(jnp.float32)),
    )
    estimator = _rotation_trick if self.gradient == "rotation" else _straight_through
    quantized = estimator(vectors, codes)
    return quantized.reshape(batch_shape + (self.dim,)), output

  def lookup(self, indices):
    """The codes of int `indices` [...] -> float32 [..., dim] (decoding tokens). Indices outside
    [0, codebook_size) give NaN rather than some other code."""
    if not hasattr(indices, "dtype") or not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError("VectorQuantizer.lookup: `indices` must be an integer array, got "
                       f"{getattr(indices, 'dtype', type(indices).__name__)}.")
    # jnp.take wraps negative indices; send them out of range so that they read as NaN too.
    indices = jnp.where(indices < 0, self.codebook_size, indices)
    return jnp.take(self.embed.value, indices, axis=0, mode="fill", fill_value=jnp.nan)

  def _kmeans_init(self, key, vectors, valid):
    """(embed, embed_avg, cluster_size) after k-means seeded with random valid batch vectors."""
    seeds = vectors[_sample_row_indices(key, valid, self.codebook_size)]
    centres, bins = kmeans(vectors, seeds, num_iters=self.kmeans_iters, valid=valid)
    return centres, centres * bins[:, None], bins

  def _ema_update(self, state, counts, sums):
    _, embed_avg, cluster_size = state
    cluster_size = self.decay * cluster_size + (1.0 - self.decay) * counts
    embed_avg = self.decay * embed_avg + (1.0 - self.decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
    return embed_avg / smoothed[:, None], embed_avg, cluster_size

  def _replace_dead_codes(self, key, state, vectors, valid):
    embed, embed_avg, cluster_size = state
    dead = cluster_size < self.dead_code_threshold
    # The k-th dead code takes the k-th draw, so the replacements are distinct whenever the batch allows.
    rank = jnp.maximum(jnp.cumsum(dead.astype(jnp.int32)) - 1, 0)
    replacement = vectors[_sample_row_indices(key, valid, self.codebook_size)[rank]]
    embed = jnp.where(dead[:, None], replacement, embed)
    embed_avg = jnp.where(dead[:, None], self.dead_code_threshold * replacement, embed_avg)
    cluster_size = jnp.where(dead, self.dead_code_threshold, cluster_size)
    return embed, embed_avg, cluster_size
