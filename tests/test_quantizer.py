"""Tests of the EMA vector quantizer against float64 NumPy re-implementations of its formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaussiantoken_jax.models import quantizer as quantizer_lib
from gaussiantoken_jax.models.quantizer import VectorQuantizer, kmeans

NUM_CODES, DIM = 8, 3
DECAY, EPS, THRESHOLD, KMEANS_ITERS = 0.8, 1e-5, 2.0, 10
QUANTIZER = VectorQuantizer(dim=DIM, codebook_size=NUM_CODES)


@functools.partial(jax.jit, static_argnames="train")
def run(codebook, x, mask, key, train):
  """One application with the codebook collection mutable: ((quantized, output), new codebook)."""
  (quantized, output), variables = QUANTIZER.apply(
      {"codebook": codebook}, x, train=train, mask=mask, rngs={"quantizer": key}, mutable=["codebook"])
  return (quantized, output), variables["codebook"]


# ----------------------------------------------------------------------------------------- NumPy references

def np_nearest(vectors, codebook):
  distances = ((vectors[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
  return distances.argmin(-1)


def np_cluster_stats(vectors, indices):
  counts = np.bincount(indices, minlength=NUM_CODES).astype(np.float64)
  sums = np.zeros((NUM_CODES, vectors.shape[1]))
  np.add.at(sums, indices, vectors)
  return counts, sums


def np_lloyd(vectors, centres, num_iters):
  """Lloyd's algorithm as vector-quantize-pytorch runs it: empty clusters keep their centre, and the bins
  returned are those of the last assignment."""
  centres = centres.copy()
  for _ in range(num_iters):
    bins, sums = np_cluster_stats(vectors, np_nearest(vectors, centres))
    centres = np.where(bins[:, None] > 0, sums / np.maximum(bins, 1.0)[:, None], centres)
  return centres, bins


def np_ema(embed_avg, cluster_size, vectors, indices, eps=EPS):
  counts, sums = np_cluster_stats(vectors, indices)
  cluster_size = DECAY * cluster_size + (1 - DECAY) * counts
  embed_avg = DECAY * embed_avg + (1 - DECAY) * sums
  total = cluster_size.sum()
  smoothed = (cluster_size + eps) / (total + NUM_CODES * eps) * total
  return embed_avg / smoothed[:, None], embed_avg, cluster_size


def np_rotation_trick_vjp(x, q, cotangent):
  """dL/dx = ||q||/||x|| R^T dL/dq with R the rotation taking x/||x|| to q/||q|| (Fifty et al. 2024)."""
  grads = []
  for xi, qi, gi in zip(x, q, cotangent):
    x_hat, q_hat = xi / np.linalg.norm(xi), qi / np.linalg.norm(qi)
    w = (x_hat + q_hat) / np.linalg.norm(x_hat + q_hat)
    rotation = np.eye(len(xi)) - 2 * np.outer(w, w) + 2 * np.outer(q_hat, x_hat)
    np.testing.assert_allclose(rotation @ x_hat, q_hat, atol=1e-12)  # the formula itself is right
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(len(xi)), atol=1e-12)
    grads.append(np.linalg.norm(qi) / np.linalg.norm(xi) * rotation.T @ gi)
  return np.stack(grads)


# --------------------------------------------------------------------------------------------- fixtures

def make_batch(seed=0):
  """40 vectors as [8, 5, 3] float32 (8 = the host CPU device count, for the sharded test)."""
  return np.random.default_rng(seed).normal(size=(8, 5, DIM)).astype(np.float32)


def make_codebook(embed, cluster_size, initted=True):
  embed = np.asarray(embed, np.float32)
  cluster_size = np.asarray(cluster_size, np.float32)
  return {"embed": jnp.asarray(embed), "embed_avg": jnp.asarray(embed * cluster_size[:, None]),
          "cluster_size": jnp.asarray(cluster_size), "initted": jnp.asarray(initted)}


def trained_codebook(seed=1):
  """An initialised codebook whose codes all stay alive for one step (cluster sizes well above 2/0.8)."""
  rng = np.random.default_rng(seed)
  return make_codebook(rng.normal(size=(NUM_CODES, DIM)), rng.uniform(3.0, 6.0, size=NUM_CODES))


def f64(a):
  return np.asarray(a, np.float64)


ALL_VALID = np.ones((8, 5), bool)
KEY = jax.random.key(0)


# ------------------------------------------------------------------------------------------------ tests

def test_init_creates_state_without_running_kmeans():
  variables = QUANTIZER.init(KEY, make_batch(), train=True)
  codebook = variables["codebook"]
  assert set(variables) == {"codebook"}  # no trainable parameters: the codebook is a buffer
  assert codebook["embed"].shape == codebook["embed_avg"].shape == (NUM_CODES, DIM)
  assert codebook["cluster_size"].shape == (NUM_CODES,)
  assert codebook["embed"].dtype == jnp.float32
  assert not bool(codebook["initted"])
  np.testing.assert_array_equal(codebook["cluster_size"], 0.0)


def test_forward_is_nearest_code_exactly():
  x, codebook = make_batch(), trained_codebook()
  (quantized, output), _ = run(codebook, x, ALL_VALID, KEY, train=False)
  embed = np.asarray(codebook["embed"])
  expected_indices = np_nearest(f64(x).reshape(-1, DIM), f64(embed)).reshape(8, 5)
  assert output.indices.dtype == jnp.int32 and output.indices.shape == (8, 5)
  np.testing.assert_array_equal(output.indices, expected_indices)
  assert quantized.dtype == jnp.float32 and quantized.shape == x.shape
  np.testing.assert_array_equal(quantized, embed[expected_indices])  # bit for bit, not just close


@pytest.mark.parametrize("gradient", ["rotation", "straight_through"])
def test_gradient_reaches_x_as_the_formula_says(gradient):
  x, codebook = make_batch(), trained_codebook()
  module = VectorQuantizer(dim=DIM, codebook_size=NUM_CODES, gradient=gradient)
  cotangent = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

  @jax.jit
  def value_and_vjp(x, cotangent):
    quantized, pullback = jax.vjp(lambda x: module.apply({"codebook": codebook}, x, train=False)[0], x)
    return quantized, pullback(cotangent)[0]

  quantized, grad = value_and_vjp(x, cotangent)
  embed = np.asarray(codebook["embed"])
  np.testing.assert_array_equal(quantized, embed[np_nearest(f64(x).reshape(-1, DIM), f64(embed))].reshape(x.shape))
  assert np.all(np.abs(np.asarray(grad)) > 0)
  if gradient == "straight_through":
    expected = f64(cotangent)
  else:
    expected = np_rotation_trick_vjp(f64(x).reshape(-1, DIM), f64(quantized).reshape(-1, DIM),
                                     f64(cotangent).reshape(-1, DIM)).reshape(x.shape)
    assert not np.allclose(expected, cotangent, atol=1e-2)  # the two estimators really differ here
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_training_step_quantizes_then_applies_ema():
  x, codebook = make_batch(), trained_codebook()
  (quantized, output), new = run(codebook, x, ALL_VALID, KEY, train=True)
  vectors, embed = f64(x).reshape(-1, DIM), f64(codebook["embed"])
  indices = np_nearest(vectors, embed)
  # Quantized with the codebook from before this step's update.
  np.testing.assert_array_equal(output.indices.reshape(-1), indices)
  np.testing.assert_array_equal(np.asarray(quantized).reshape(-1, DIM), np.asarray(codebook["embed"])[indices])
  expected = np_ema(f64(codebook["embed_avg"]), f64(codebook["cluster_size"]), vectors, indices)
  assert np.all(expected[2] >= THRESHOLD)  # no dead code in this test
  for name, value in zip(("embed", "embed_avg", "cluster_size"), expected):
    np.testing.assert_allclose(new[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert bool(new["initted"])


def test_ema_update_applies_laplace_smoothing():
  """embed = avg / ((cs + eps) / (sum(cs) + N eps) * sum(cs)), with an eps large enough to see.

  At the default eps = 1e-5 both eps terms move the codes by ~1e-6 relative, under float32 tolerance; with eps = 0.5
  and cluster sizes of order 1 they move them by tens of percent, so dropping either term fails here. Dead-code
  resets are off (threshold 0) so every code goes through the smoothing formula.
  """
  eps = 0.5
  module = VectorQuantizer(dim=DIM, codebook_size=NUM_CODES, eps=eps, dead_code_threshold=0.0)
  rng = np.random.default_rng(14)
  codebook = make_codebook(rng.normal(size=(NUM_CODES, DIM)), rng.uniform(0.1, 1.0, size=NUM_CODES))
  x = make_batch(15)
  _, new = jax.jit(lambda cb, x: module.apply({"codebook": cb}, x, train=True, rngs={"quantizer": KEY},
                                              mutable=["codebook"]))(codebook, x)
  vectors = f64(x).reshape(-1, DIM)
  indices = np_nearest(vectors, f64(codebook["embed"]))
  expected = np_ema(f64(codebook["embed_avg"]), f64(codebook["cluster_size"]), vectors, indices, eps=eps)
  unsmoothed = expected[1] / expected[2][:, None]
  assert np.abs(expected[0] - unsmoothed).max() > 0.1 * np.abs(unsmoothed).max()  # the smoothing shows
  for name, value in zip(("embed", "embed_avg", "cluster_size"), expected):
    np.testing.assert_allclose(new["codebook"][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_mask_excludes_rows_from_statistics_and_update():
  x, codebook = make_batch(), trained_codebook()
  mask = np.random.default_rng(3).uniform(size=(8, 5)) > 0.35
  x[~mask] = 1e3  # padding far from everything: it would dominate any statistic it leaked into
  (quantized, output), new = run(codebook, x, mask, KEY, train=True)
  vectors, valid, embed = f64(x).reshape(-1, DIM), mask.reshape(-1), f64(codebook["embed"])
  indices = np_nearest(vectors, embed)
  np.testing.assert_array_equal(output.indices.reshape(-1), indices)  # masked rows are still quantized
  expected = np_ema(f64(codebook["embed_avg"]), f64(codebook["cluster_size"]), vectors[valid], indices[valid])
  for name, value in zip(("embed", "embed_avg", "cluster_size"), expected):
    np.testing.assert_allclose(new[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  # Batch statistics over the unmasked rows only.
  counts = np.bincount(indices[valid], minlength=NUM_CODES)
  probs = counts[counts > 0] / valid.sum()
  np.testing.assert_allclose(output.perplexity, np.exp(-(probs * np.log(probs)).sum()), rtol=1e-5)
  np.testing.assert_allclose(output.usage, (counts > 0).mean(), rtol=1e-6)
  commitment = ((embed[indices[valid]] - vectors[valid]) ** 2).mean()
  np.testing.assert_allclose(output.commitment_loss, commitment, rtol=1e-5)


def test_perplexity_usage_and_commitment_without_mask():
  x, codebook = make_batch(4), trained_codebook()
  (_, output), _ = run(codebook, x, ALL_VALID, KEY, train=False)
  (_, unmasked_output), _ = QUANTIZER.apply({"codebook": codebook}, x, train=False, mutable=["codebook"])
  vectors, embed = f64(x).reshape(-1, DIM), f64(codebook["embed"])
  indices = np_nearest(vectors, embed)
  counts = np.bincount(indices, minlength=NUM_CODES)
  probs = counts[counts > 0] / len(indices)
  for out in (output, unmasked_output):  # mask=None means every row counts
    np.testing.assert_allclose(out.perplexity, np.exp(-(probs * np.log(probs)).sum()), rtol=1e-5)
    np.testing.assert_allclose(out.usage, (counts > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(out.commitment_loss, ((embed[indices] - vectors) ** 2).mean(), rtol=1e-5)


def test_commitment_loss_pulls_unmasked_inputs_towards_their_codes():
  """d commitment / dx = 2 mask (x - q) / (num_valid * dim): the loss trains the encoder, never the (buffer) codes.

  A stop_gradient on the wrong side (sg(x) instead of sg(q)) leaves the loss's value unchanged but its gradient 0.
  float32 differences of O(1) values: rtol 1e-5 is a few roundings.
  """
  x, codebook = make_batch(16), trained_codebook()
  mask = np.random.default_rng(17).uniform(size=(8, 5)) > 0.3
  grad = jax.jit(jax.grad(lambda x: QUANTIZER.apply({"codebook": codebook}, x, train=False, mask=mask)[1]
                          .commitment_loss))(x)
  embed = f64(codebook["embed"])
  quantized = embed[np_nearest(f64(x).reshape(-1, DIM), embed)].reshape(x.shape)
  expected = 2.0 * mask[..., None] * (f64(x) - quantized) / (mask.sum() * DIM)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_dead_codes_are_reset_to_distinct_unmasked_batch_vectors():
  x, codebook = make_batch(), trained_codebook()
  dead_codes, at_threshold = [1, 5], 3
  embed = np.asarray(codebook["embed"]).copy()
  embed[dead_codes + [at_threshold]] = 100.0 + np.arange(3)[:, None]  # far away: they get no vectors
  cluster_size = np.asarray(codebook["cluster_size"]).copy()
  cluster_size[dead_codes] = 0.5
  # A code with no vectors whose EMA size lands exactly on the threshold (0.8 * 2.5 = 2 in float32 and float64):
  # dead means strictly below it (vector-quantize-pytorch's `cluster_size < threshold_ema_dead_code`), so it stays.
  cluster_size[at_threshold] = 2.5
  codebook = make_codebook(embed, cluster_size)
  mask = np.random.default_rng(5).uniform(size=(8, 5)) > 0.3
  (_, _), new = run(codebook, x, mask, KEY, train=True)

  vectors, valid = f64(x).reshape(-1, DIM), mask.reshape(-1)
  indices = np_nearest(vectors, f64(embed))
  expected = np_ema(f64(codebook["embed_avg"]), f64(cluster_size), vectors[valid], indices[valid])
  dead = expected[2] < THRESHOLD
  np.testing.assert_array_equal(np.flatnonzero(dead), dead_codes)
  assert expected[2][at_threshold] == THRESHOLD and new["cluster_size"][at_threshold] == THRESHOLD
  for name, value in zip(("embed", "embed_avg", "cluster_size"), expected):
    np.testing.assert_allclose(np.asarray(new[name])[~dead], value[~dead], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(np.asarray(new["cluster_size"])[dead], THRESHOLD)
  replaced = np.asarray(new["embed"])[dead]
  np.testing.assert_array_equal(np.asarray(new["embed_avg"])[dead], THRESHOLD * replaced)
  # Each replacement is one of the unmasked batch vectors, and no two codes get the same one.
  matches = [np.flatnonzero((x.reshape(-1, DIM) == row).all(-1)) for row in replaced]
  assert all(len(m) == 1 and valid[m[0]] for m in matches)
  assert len({int(m[0]) for m in matches}) == len(dead_codes)


def first_valid_rows(key, valid, num):
  """Deterministic stand-in for the random row sampler: the valid rows in order, cycling."""
  del key
  order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int32), stable=True)
  return order[jnp.arange(num) % jnp.maximum(jnp.sum(valid), 1)]


def test_first_training_step_runs_kmeans_then_ema_then_dead_codes(monkeypatch):
  monkeypatch.setattr(quantizer_lib, "_sample_row_indices", first_valid_rows)
  x = make_batch(6)
  mask = np.random.default_rng(7).uniform(size=(8, 5)) > 0.25
  # An outlier that seeds its own cluster of one: that code ends below the threshold and is reset.
  x[0, 0], mask[0, 0] = 10.0, True
  fresh = QUANTIZER.init(KEY, x, train=True)["codebook"]
  # A fresh jit (not `run`), so that the patched sampler is traced in.
  step = jax.jit(lambda codebook, x, mask: QUANTIZER.apply(
      {"codebook": codebook}, x, train=True, mask=mask, rngs={"quantizer": KEY}, mutable=["codebook"]))
  (quantized, output), new = step(fresh, x, mask)
  new = new["codebook"]

  vectors, valid = f64(x).reshape(-1, DIM), mask.reshape(-1)
  valid_vectors = vectors[valid]
  centres, bins = np_lloyd(valid_vectors, valid_vectors[:NUM_CODES], KMEANS_ITERS)
  indices = np_nearest(vectors, centres)
  np.testing.assert_array_equal(output.indices.reshape(-1), indices)
  np.testing.assert_allclose(np.asarray(quantized).reshape(-1, DIM), centres[indices], rtol=1e-5, atol=1e-6)
  embed, embed_avg, cluster_size = np_ema(centres * bins[:, None], bins, valid_vectors, indices[valid])
  dead = cluster_size < THRESHOLD
  assert 0 < dead.sum() < NUM_CODES  # the data exercises both the live and the dead path
  replacement = valid_vectors[np.arange(dead.sum()) % len(valid_vectors)]
  embed[dead], embed_avg[dead], cluster_size[dead] = replacement, THRESHOLD * replacement, THRESHOLD
  for name, value in (("embed", embed), ("embed_avg", embed_avg), ("cluster_size", cluster_size)):
    np.testing.assert_allclose(new[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert bool(new["initted"])


def test_row_sampler_draws_distinct_valid_rows():
  valid = np.zeros(40, bool)
  valid[np.random.default_rng(8).permutation(40)[:30]] = True
  rows = np.asarray(quantizer_lib._sample_row_indices(KEY, jnp.asarray(valid), NUM_CODES))
  assert len(set(rows.tolist())) == NUM_CODES and valid[rows].all()
  other = np.asarray(quantizer_lib._sample_row_indices(jax.random.key(1), jnp.asarray(valid), NUM_CODES))
  assert not np.array_equal(rows, other)
  # Fewer valid rows than draws: every valid row is used before any repeats.
  few = np.zeros(40, bool)
  few[[3, 17, 29]] = True
  rows = np.asarray(quantizer_lib._sample_row_indices(KEY, jnp.asarray(few), NUM_CODES))
  assert few[rows].all() and set(rows[:3].tolist()) == {3, 17, 29}


def test_kmeans_matches_numpy_lloyd():
  rng = np.random.default_rng(9)
  vectors = rng.normal(size=(40, DIM)).astype(np.float32)
  valid = rng.uniform(size=40) > 0.2
  initial = rng.normal(size=(NUM_CODES, DIM)).astype(np.float32)
  initial[6] = 50.0  # gets no vector, so it must stay where it is
  centres, bins = kmeans(vectors, initial, num_iters=KMEANS_ITERS, valid=jnp.asarray(valid))
  expected_centres, expected_bins = np_lloyd(f64(vectors)[valid], f64(initial), KMEANS_ITERS)
  assert expected_bins[6] == 0
  np.testing.assert_allclose(centres, expected_centres, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(bins, expected_bins)


def test_eval_mode_leaves_state_unchanged():
  rng = np.random.default_rng(10)
  for codebook in (trained_codebook(), make_codebook(rng.normal(size=(NUM_CODES, DIM)), np.zeros(NUM_CODES),
                                                     initted=False)):
    _, new = run(codebook, make_batch(), ALL_VALID, KEY, train=False)
    for name in codebook:
      np.testing.assert_array_equal(new[name], codebook[name], err_msg=name)


def test_training_step_without_unmasked_vectors_changes_nothing():
  for codebook in (trained_codebook(), make_codebook(np.zeros((NUM_CODES, DIM)), np.zeros(NUM_CODES), False)):
    _, new = run(codebook, make_batch(), np.zeros((8, 5), bool), KEY, train=True)
    for name in codebook:
      np.testing.assert_array_equal(new[name], codebook[name], err_msg=name)


def test_sharded_training_step_matches_single_device():
  """Batch sums under jit over a sharded batch are global sums: the update equals the unsharded one."""
  x = make_batch(11)
  fresh = make_codebook(np.zeros((NUM_CODES, DIM)), np.zeros(NUM_CODES), initted=False)  # k-means runs too
  (_, expected_output), expected = run(fresh, x, ALL_VALID, KEY, train=True)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  shard = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec("data")))
  (_, output), new = run(fresh, shard(x), shard(ALL_VALID), KEY, train=True)
  np.testing.assert_array_equal(output.indices, expected_output.indices)
  for name in ("embed", "embed_avg", "cluster_size"):
    np.testing.assert_allclose(new[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_lookup_returns_codes_and_nan_out_of_range():
  codebook = trained_codebook()
  indices = jnp.asarray([[0, 7, 3], [-1, 8, 2]], jnp.int32)
  codes = np.asarray(QUANTIZER.apply({"codebook": codebook}, indices, method="lookup"))
  embed = np.asarray(codebook["embed"])
  assert codes.shape == (2, 3, DIM) and codes.dtype == np.float32
  np.testing.assert_array_equal(codes[0], embed[[0, 7, 3]])
  np.testing.assert_array_equal(codes[1, 2], embed[2])
  assert np.isnan(codes[1, :2]).all()


def test_low_precision_input_is_quantized_in_float32():
  x, codebook = make_batch(12), trained_codebook()
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  quantized, output = QUANTIZER.apply({"codebook": codebook}, x_bf16, train=False)
  embed = np.asarray(codebook["embed"])
  indices = np_nearest(f64(jnp.asarray(x_bf16, jnp.float32)).reshape(-1, DIM), f64(embed))
  assert quantized.dtype == jnp.float32
  np.testing.assert_array_equal(output.indices.reshape(-1), indices)


@pytest.mark.parametrize("call, message", [
    (lambda cb: QUANTIZER.apply(cb, jnp.zeros((4, DIM + 1)), train=False), r"`x` must have shape \[\.\.\., 3\]"),
    (lambda cb: QUANTIZER.apply(cb, jnp.zeros((4, DIM), jnp.int32), train=False), "`x` must be a floating"),
    (lambda cb: QUANTIZER.apply(cb, jnp.zeros((4, DIM)), train=False, mask=jnp.ones((5,), bool)), "`mask`"),
    (lambda cb: QUANTIZER.apply(cb, jnp.zeros((4, DIM)), train=False, mask=jnp.ones((4,))), "`mask`"),
    (lambda cb: QUANTIZER.apply(cb, jnp.zeros((2,)), method="lookup"), "`indices` must be an integer"),
    (lambda cb: VectorQuantizer(dim=DIM, codebook_size=NUM_CODES, gradient="ste").apply(
        cb, jnp.zeros((4, DIM)), train=False), "`gradient`"),
    (lambda cb: VectorQuantizer(dim=DIM, codebook_size=NUM_CODES, decay=1.0).apply(
        cb, jnp.zeros((4, DIM)), train=False), "`decay`"),
    (lambda cb: kmeans(jnp.zeros((10, DIM)), jnp.zeros((4, DIM + 1)), num_iters=2), "`initial_centres`"),
    (lambda cb: kmeans(jnp.zeros((10, DIM)), jnp.zeros((4, DIM)), num_iters=0), "`num_iters`"),
])
def test_bad_inputs_raise_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call({"codebook": trained_codebook()})
