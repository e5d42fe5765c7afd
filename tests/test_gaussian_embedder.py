"""Tests of the Gaussian embedder: outputs, identical block init, range schedule, position embedding, sizes."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.models.gaussian_embedder import (GaussianEmbedder, Gaussians, _FeedForward, _IdenticalInitStack,
                                                        anchor_init, sine_position_embedding)
from test_deformable_attention import _numpy_softmax, numpy_bilinear_sample, numpy_deformable_attention

# A small map and few Gaussians, with the reference structure (3 blocks, 2 + 2 layers, D' = 64).
BATCH, HEIGHT, WIDTH, NUM_GAUSSIANS, FEATURE_DIM = 2, 4, 6, 9, 3  # 9: a 3 x 3 grid of anchors
MODULE = GaussianEmbedder(num_gaussians=NUM_GAUSSIANS, feature_dim=FEATURE_DIM)


@functools.partial(jax.jit, static_argnames="train")
def _apply(variables, feature_map, dropout_key, *, train):
  return MODULE.apply(variables, feature_map, train=train, rngs={"dropout": dropout_key},
                      mutable=["range_scheduler"])


@pytest.fixture(scope="module")
def feature_map():
  return jax.random.normal(jax.random.key(1), (BATCH, HEIGHT, WIDTH, 64))


@pytest.fixture(scope="module")
def variables(feature_map):
  return jax.jit(functools.partial(MODULE.init, train=False))(jax.random.key(0), feature_map)


@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_ranges_and_state(variables, feature_map, train):
  gaussians, state = _apply(variables, feature_map, jax.random.key(2), train=train)
  assert isinstance(gaussians, Gaussians)
  assert gaussians.means.shape == (BATCH, NUM_GAUSSIANS, 2)
  assert gaussians.rotations.shape == (BATCH, NUM_GAUSSIANS)
  assert gaussians.scales.shape == (BATCH, NUM_GAUSSIANS, 2)
  assert gaussians.features.shape == (BATCH, NUM_GAUSSIANS, FEATURE_DIM)
  for x in jax.tree.leaves(gaussians):
    assert x.dtype == jnp.float32 and np.isfinite(x).all()
  assert np.all(np.abs(gaussians.means) < 1.0)
  assert np.all((gaussians.rotations > 0.0) & (gaussians.rotations < np.pi))
  assert np.all((gaussians.scales >= 0.1) & (gaussians.scales <= 4.0))
  assert np.std(gaussians.means) > 0.05  # random anchor positions, not one point
  initial = variables["range_scheduler"]
  assert (float(initial["scale_max"]), float(initial["scale_mean"])) == (4.0, np.float32(2.05))
  updated = jax.tree.map(lambda a, b: bool(a != b), state["range_scheduler"], initial)
  assert updated == {"scale_max": train, "scale_mean": train}  # only training calls move the schedule


def test_dropout_only_in_training(variables, feature_map):
  eval_a, _ = _apply(variables, feature_map, jax.random.key(3), train=False)
  eval_b, _ = _apply(variables, feature_map, jax.random.key(4), train=False)
  train_a, _ = _apply(variables, feature_map, jax.random.key(3), train=True)
  train_b, _ = _apply(variables, feature_map, jax.random.key(4), train=True)
  np.testing.assert_array_equal(eval_a.features, eval_b.features)
  assert not np.allclose(train_a.features, train_b.features)
  with pytest.raises(flax.errors.InvalidRngError):
    jax.eval_shape(lambda v, x: MODULE.apply(v, x, train=True), variables, feature_map)


def _stack_slices_identical(tree, axis):
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
  return all(np.array_equal(np.take(leaf, i, axis=axis), np.take(leaf, 0, axis=axis))
             for leaf in leaves for i in range(leaf.shape[axis]))


def test_stacked_copies_start_identical(variables):
  params = variables["params"]
  blocks, decoder, encoder = params["blocks"], params["blocks"]["cross_attn"], params["encoder"]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(blocks)} == {3}
  assert {leaf.shape[:2] for leaf in jax.tree.leaves(decoder)} == {(3, 2)}
  assert {leaf.shape[0] for leaf in jax.tree.leaves(encoder)} == {2}
  assert _stack_slices_identical(blocks, 0)  # the three blocks
  assert _stack_slices_identical(decoder, 1)  # the two layers inside each decoder
  assert _stack_slices_identical(encoder, 0)  # the two encoder layers
  # ...from a real random draw, and a different one per op type.
  in_proj = decoder["self_attn"]["in_proj_kernel"][0, 0]
  assert np.std(in_proj) > 0.05
  np.testing.assert_allclose(np.abs(in_proj).max(), np.sqrt(6.0 / (64 + 192)), rtol=0.05)  # torch in_proj bound
  assert not np.allclose(encoder["self_attn"]["value_proj"]["kernel"][0],
                         decoder["cross_attn"]["value_proj"]["kernel"][0, 0])


class _DropoutProbe(nn.Module):
  """A stackable layer that appends the dropout mask it draws to its carry (and holds a parameter, as the
  embedder's layers do)."""

  @nn.compact
  def __call__(self, masks):
    self.param("unused", nn.initializers.zeros, ())
    return (*masks, nn.Dropout(0.5, deterministic=False)(jnp.ones(1000)))


def test_stacked_copies_draw_their_own_dropout_masks():
  """The copies share their init, not their dropout: each draws its own mask from the call's key. Two
  independent masks at rate 0.5 differ at 50% of 1000 positions (binomial std 1.6%); equal keys would give 0%."""
  stack = _IdenticalInitStack(_DropoutProbe, 3, ())
  variables = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, ())
  masks = [np.asarray(m) for m in stack.apply(variables, (), rngs={"dropout": jax.random.key(2)})]
  assert len(masks) == 3
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert 0.4 < np.mean((masks[i] == 0) != (masks[j] == 0)) < 0.6, (i, j)
  again = stack.apply(variables, (), rngs={"dropout": jax.random.key(2)})
  for mask, same in zip(masks, again):
    np.testing.assert_array_equal(mask, same)  # and the draws are the key's, reproducibly


def test_feed_forward_drops_out_both_the_hidden_layer_and_the_residual_branch():
  """LN(x + Drop(W2 Drop(ReLU(W1 x)))) in training, with W1 = W2 = I, zero biases and rate 0.5 (a kept value is
  doubled): on x = (1, 1, 0, 0) the LayerNorm's input is (f1, f2, 0, 0), f = 1 + 4 m1 m2 in {1, 5}, and its output
  z gives f1 / f2 = (z0 - z2) / (z1 - z2). Either dropout alone would give f in {1, 3}."""
  module = _FeedForward(dim=4, hidden_dim=4, dropout=0.5, train=True)
  eye = jnp.eye(4)
  params = {"Dense_0": {"kernel": eye, "bias": jnp.zeros(4)}, "Dense_1": {"kernel": eye, "bias": jnp.zeros(4)},
            "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
  x = jnp.tile(jnp.array([1.0, 1.0, 0.0, 0.0]), (64, 1))
  z = np.asarray(jax.jit(module.apply)({"params": params}, x, rngs={"dropout": jax.random.key(6)}), np.float64)
  ratios = (z[:, 0] - z[:, 2]) / (z[:, 1] - z[:, 2])
  # float32 LayerNorm of O(1) values: the ratio to ~1e-6; the wrong factor 3 is 0.4 away from 5 or 1/5.
  nearest = np.array([5.0, 1.0, 0.2])[np.argmin(np.abs(ratios[:, None] - np.array([5.0, 1.0, 0.2])), axis=1)]
  np.testing.assert_allclose(ratios, nearest, rtol=1e-4)
  assert set(nearest.tolist()) == {5.0, 1.0, 0.2}  # 64 rows draw every case (P(miss one) < 1e-5)


def test_range_scheduler_follows_the_formula_over_three_steps(variables, feature_map):
  state = {"scale_max": 4.0, "scale_mean": 2.05}
  # Default start, then a start far above the range midpoint so that the decay is large and hits the floor.
  for start in (None, {"scale_max": 3.005, "scale_mean": 5.0}):
    if start is not None:
      state = start
    for step in range(3):
      current = {"params": variables["params"],
                 "range_scheduler": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)}
      gaussians, new_state = _apply(current, feature_map, jax.random.key(10 + step), train=True)
      s_max, m = np.float64(np.float32(state["scale_max"])), np.float64(np.float32(state["scale_mean"]))
      scales = np.asarray(gaussians.scales, np.float64)
      assert scales.max() <= s_max + 1e-6  # this call's scales use the current s_max
      m = 0.01 * scales.mean() + 0.99 * m
      if s_max > 3.0:
        s_max = max(s_max - 1e-3 * max(m - (s_max + 0.1) / 2, 0.01), 3.0)
      got = new_state["range_scheduler"]
      np.testing.assert_allclose(float(got["scale_mean"]), m, rtol=0, atol=2e-6)
      np.testing.assert_allclose(float(got["scale_max"]), s_max, rtol=0, atol=2e-6)
      state = {k: float(v) for k, v in got.items()}
  assert state["scale_max"] == 3.0  # clamped at the final value, then held


def test_scales_scale_affinely_with_scale_max(variables, feature_map):
  """scale = 0.1 + (s_max - 0.1) * sigmoid(.): two s_max values give the same sigmoid."""
  def run(s_max):
    current = {"params": variables["params"],
               "range_scheduler": {"scale_max": jnp.float32(s_max), "scale_mean": jnp.float32(2.05)}}
    return np.asarray(_apply(current, feature_map, jax.random.key(0), train=False)[0].scales, np.float64)

  np.testing.assert_allclose((run(4.0) - 0.1) / 3.9, (run(3.0) - 0.1) / 2.9, rtol=1e-5)


def numpy_detr_sine_embedding(height, width, dim):
  """DETR's PositionEmbeddingSine(num_pos_feats=dim/2, normalize=True, scale=2 pi), channel-last."""
  num_feats, eps, scale = dim // 2, 1e-6, 2 * np.pi
  y_embed = np.cumsum(np.ones((height, width)), axis=0)
  x_embed = np.cumsum(np.ones((height, width)), axis=1)
  y_embed = (y_embed - 0.5) / (y_embed[-1:, :] + eps) * scale
  x_embed = (x_embed - 0.5) / (x_embed[:, -1:] + eps) * scale
  dim_t = 10000.0 ** (2 * (np.arange(num_feats) // 2) / num_feats)
  pos_x = x_embed[:, :, None] / dim_t
  pos_y = y_embed[:, :, None] / dim_t
  pos_x = np.stack([np.sin(pos_x[:, :, 0::2]), np.cos(pos_x[:, :, 1::2])], axis=3).reshape(height, width, -1)
  pos_y = np.stack([np.sin(pos_y[:, :, 0::2]), np.cos(pos_y[:, :, 1::2])], axis=3).reshape(height, width, -1)
  return np.concatenate([pos_y, pos_x], axis=-1)


@pytest.mark.parametrize("height, width, dim", [(3, 5, 64), (16, 16, 64), (4, 2, 16)])
def test_sine_position_embedding_matches_detr_formula(height, width, dim):
  got = sine_position_embedding(height, width, dim)
  assert got.shape == (height, width, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, numpy_detr_sine_embedding(height, width, dim), atol=2e-6)


def test_anchor_init_layout():
  anchors = np.asarray(anchor_init(jax.random.key(5), (4096, 69)), np.float64)
  sig = 1.0 / (1.0 + np.exp(-anchors))
  # Centres (0:2) and scales (3:5): logit(U(0, 1)), i.e. sigmoid gives uniform quantiles.
  for column in (0, 1, 3, 4):
    np.testing.assert_allclose(np.quantile(sig[:, column], [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.03)
  np.testing.assert_array_equal(anchors[:, 2], 0.0)  # rotation slot
  assert abs(anchors[:, 5:].mean()) < 0.02 and abs(anchors[:, 5:].std() - 1.0) < 0.02  # N(0, 1) features
  assert np.abs(anchors[:, :5]).max() <= np.log(0.9999 / 1e-4) + 1e-3  # the logit's clamp


@pytest.mark.parametrize("shift", [(0.3, -0.2), (12.0, -12.0)])
def test_the_centre_moves_residually_through_every_block(variables, feature_map, shift):
  """With the refinement head's centre outputs fixed at a bias d (kernel 0), each block adds d to the centre's
  logit: means = 2 sigmoid(clip(anchor_xy + num_blocks * d, -9.21, 9.21)) - 1, whatever the image. A refinement
  that replaced the centre instead would give 2 sigmoid(d) - 1. The large shift drives the logits to about +-36,
  past the clamp, where an unclamped float32 sigmoid would round to exactly 1 and put the centre on the map's edge
  instead of inside (-1, 1) (0.9998 at the clamp, 1e4 times the tolerance away)."""
  params = flax.core.unfreeze(variables["params"])
  head = params["blocks"]["refine"]["Dense_0"]  # stacked over the blocks: kernel [num_blocks, D', 5 + D']
  num_blocks = head["kernel"].shape[0]
  shift = np.array(shift)
  head["kernel"] = head["kernel"].at[..., :2].set(0.0)
  head["bias"] = head["bias"].at[..., :2].set(shift)
  gaussians, _ = _apply({**variables, "params": params}, feature_map, jax.random.key(0), train=False)
  anchors_xy = np.asarray(params["anchors"][:, :2], np.float64)
  step_scale = np.asarray(params["blocks"]["refine"]["scale"][:, :2], np.float64)  # learnable, 1 at init
  logits = np.clip(anchors_xy + (shift * step_scale).sum(axis=0), -9.21, 9.21)
  expected = 2.0 / (1.0 + np.exp(-logits)) - 1.0
  assert num_blocks == 3 and np.all(np.abs(gaussians.means) < 1.0)
  np.testing.assert_allclose(np.asarray(gaussians.means), np.broadcast_to(expected, (BATCH,) + expected.shape),
                             atol=1e-6)


def test_grid_anchors_start_at_the_cell_centres_of_a_square_grid():
  anchors = np.asarray(anchor_init(jax.random.key(5), (16, 69), grid=True), np.float64)
  centres = 1.0 / (1.0 + np.exp(-anchors[:, :2]))
  cells = (np.arange(4) + 0.5) / 4
  expected = np.stack([np.tile(cells, 4), np.repeat(cells, 4)], axis=-1)  # row-major, x along the columns
  np.testing.assert_allclose(centres, expected, atol=1e-6)
  with pytest.raises(ValueError, match="square number of Gaussians.*got 8"):
    anchor_init(jax.random.key(5), (8, 69), grid=True)


def test_an_embedder_without_encoder_layers_holds_no_zero_size_parameters(feature_map):
  """`num_encoder_layers=0` leaves out the encoder's parameters: Orbax refuses to save zero-size arrays."""
  module = GaussianEmbedder(num_gaussians=NUM_GAUSSIANS, feature_dim=FEATURE_DIM, num_encoder_layers=0)
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(3), feature_map)
  assert "encoder" not in shapes["params"]
  assert all(leaf.size > 0 for leaf in jax.tree.leaves(shapes))


def test_centre_feature_adds_a_linear_read_of_the_memory_at_each_centre(feature_map):
  """features = feature head + bilinear(memory, centre) @ W + b, checked against float64 NumPy.

  Without the self-attention encoder the memory is the lifter's GroupNorm output, which the module records.
  """
  module = GaussianEmbedder(num_gaussians=NUM_GAUSSIANS, feature_dim=FEATURE_DIM, num_encoder_layers=0)
  variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(3), feature_map)
  # Jitted: run eagerly, each small op of the module compiles a program of its own (~20 s here).
  apply = jax.jit(functools.partial(module.apply, train=False, capture_intermediates=True))
  gaussians, recorded = apply(variables, feature_map)
  memory = np.asarray(recorded["intermediates"]["input_norm"]["__call__"][0], np.float64)
  read = variables["params"]["centre_to_features"]
  without_read = flax.core.unfreeze(variables)
  without_read["params"]["centre_to_features"] = jax.tree.map(jnp.zeros_like, read)
  head_only = apply(without_read, feature_map)[0].features

  centres = (np.asarray(gaussians.means, np.float64) + 1.0) / 2.0
  at_centres = numpy_bilinear_sample(memory[..., None, :], centres[:, :, None, None, :])[:, :, 0, 0]
  expected = at_centres @ np.asarray(read["kernel"], np.float64) + np.asarray(read["bias"], np.float64)
  # float32 sums of 64 terms of size ~1 and a subtraction of two ~1 outputs: ~1e-6; 2e-5 leaves margin.
  np.testing.assert_allclose(np.asarray(gaussians.features - head_only, np.float64), expected, atol=2e-5)


def expected_parameter_count(num_gaussians, feature_dim, dim=64, heads=4, points=4, hidden=256):
  """Trainable parameters of the embedder from the layer sizes of reference section 2.5 (no unused heads)."""
  dense = lambda i, o: i * o + o  # noqa: E731
  norm = lambda d: 2 * d  # noqa: E731
  msda = dense(dim, heads * points * 2) + dense(dim, heads * (points + 1)) + 2 * dense(dim, dim)
  mlp = dense(dim, hidden) + dense(hidden, dim) + norm(dim)
  encoder_layer = msda + norm(dim) + mlp
  decoder_layer = dense(dim, 3 * dim) + dense(dim, dim) + norm(dim) + msda + norm(dim) + mlp
  asymmetric_ffn = norm(2 * dim) + dense(2 * dim, dim) + dense(2 * dim, hidden) + dense(hidden, dim)
  trunk = 2 * (2 * dense(dim, dim) + norm(dim))
  centre_read = dense(dim, feature_dim)  # the centre feature (a deliberate difference, docs/differences.md)
  refine = trunk + dense(dim, 5 + dim) + (5 + dim)
  to_features = trunk + dense(dim, feature_dim) + feature_dim
  relu_norm_mlp = lambda i: dense(i, dim) + norm(dim) + dense(dim, dim) + norm(dim)  # noqa: E731
  anchor_encoder = sum(relu_norm_mlp(i) for i in (2, 1, 2, dim, dim))
  lifter = dense(dim, dim) + norm(dim)  # 1x1 conv + GroupNorm
  return (num_gaussians * (5 + dim) + lifter + 2 * encoder_layer + 3 * (2 * decoder_layer + asymmetric_ffn + refine)
          + anchor_encoder + to_features + centre_read)


@pytest.mark.parametrize("num_gaussians, feature_dim, size", [(64, 3, 16), (256, 8, 32)])
def test_parameter_count(num_gaussians, feature_dim, size):
  module = GaussianEmbedder(num_gaussians=num_gaussians, feature_dim=feature_dim)
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 64), jnp.float32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  print(f"GaussianEmbedder K={num_gaussians} z={feature_dim}: {count} trainable parameters")
  assert count == expected_parameter_count(num_gaussians, feature_dim)
  assert 0.75e6 < count < 0.79e6  # the reference's 0.79M / 0.80M less its two unused to_features heads


def test_forward_backward_is_finite_and_reaches_every_parameter(variables, feature_map):
  weights = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape),
                         jax.eval_shape(lambda: _apply(variables, feature_map, jax.random.key(0), train=True)[0]))

  @jax.jit
  def loss_and_grads(params):
    def loss(p):
      gaussians, _ = MODULE.apply({"params": p, "range_scheduler": variables["range_scheduler"]}, feature_map,
                                  train=True, rngs={"dropout": jax.random.key(8)}, mutable=["range_scheduler"])
      return sum(jnp.sum(w * x) for w, x in zip(jax.tree.leaves(weights), jax.tree.leaves(gaussians)))
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grads(variables["params"])
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("shape, dtype, match", [
    ((BATCH, HEIGHT * WIDTH, 64), jnp.float32, r"must have shape \[B, h, w, 64\]"),
    ((BATCH, HEIGHT, WIDTH, 32), jnp.float32, r"must have shape \[B, h, w, 64\]"),
    ((BATCH, HEIGHT, WIDTH, 64), jnp.int32, "floating-point"),
])
def test_rejects_bad_input(variables, shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    MODULE.apply(variables, jnp.zeros(shape, dtype), train=False)


def test_mlp_parts_use_pytorch_linear_init_and_the_initial_scale_sets_the_scale_bias(variables):
  """The reference keeps PyTorch's default Linear init (kernel and bias U(+-1/sqrt(fan_in))) in the anchor
  encoder, the asymmetric FFN, the refinement MLP and the feature head; xavier (zero bias) only in the
  attention layers and the lifter. The refinement head's scale outputs start at logit((s - s_min) /
  (s_max - s_min)) for `initial_scale` s."""
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  torch_style = [path for path in params if path.startswith(("anchor_encoder/", "blocks/ffn/", "blocks/refine/",
                                                               "to_features/")) and path.endswith("/kernel")]
  assert len(torch_style) == 23  # 10 anchor encoder, 3 FFN, 5 refinement, 5 feature head
  for path in torch_style:
    kernel = np.asarray(params[path])
    bound = kernel.shape[-2] ** -0.5
    bias = np.asarray(params[path[:-len("kernel")] + "bias"])
    if path == "blocks/refine/Dense_0/kernel":
      bias = np.delete(bias, [3, 4], axis=-1)
    # U(-b, b) has max |x| < b and std b / sqrt(3); xavier's bound sqrt(6 / (fan_in + fan_out)) is larger.
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, path
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.1), path
    assert np.abs(bias).max() > 0.5 * bound, path  # not xavier's zero bias
  attention_bias = np.asarray(params["blocks/cross_attn/self_attn/in_proj_bias"])
  assert not attention_bias.any()
  expected = np.log((1.0 - 0.1) / (4.0 - 1.0))  # initial_scale 1, range [0.1, 4]
  refine_bias = np.asarray(params["blocks/refine/Dense_0/bias"])
  np.testing.assert_allclose(refine_bias[:, 3:5], expected, rtol=1e-6)


@pytest.mark.parametrize("initial_scale", [0.1, 4.0, -1.0])
def test_rejects_an_initial_scale_outside_the_range(feature_map, initial_scale):
  module = GaussianEmbedder(num_gaussians=NUM_GAUSSIANS, feature_dim=FEATURE_DIM, initial_scale=initial_scale)
  with pytest.raises(ValueError, match=f"initial_scale must lie strictly between scale_min=0.1 and "
                                       f"scale_max_init=4.0, got {initial_scale}"):
    jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), feature_map)  # traced only


# ---------------------------------------------------------------------------------------------------------------
# The whole embedder against an independent float64 NumPy forward written from the formulas (tiny sizes), and
# its input gradient against central finite differences of that forward.

ORACLE_SIZES = dict(num_gaussians=4, feature_dim=3, embed_dim=8, num_heads=2, num_points=2, num_blocks=2,
                    num_encoder_layers=2, num_decoder_layers=2, mlp_dim=12, ffn_dim=10, num_groups=2)
ORACLE_MODULE = GaussianEmbedder(**ORACLE_SIZES)  # grid anchors and the centre feature: the defaults
ORACLE_SCALE_MAX = 3.5  # not the initial 4.0, so that a scale range not read from "range_scheduler" shows


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _relu(x):
  return np.maximum(x, 0.0)


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _normalise(x, axes, eps=1e-5):
  mean = x.mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


def _layer_norm(p, x):
  return _normalise(x, -1) * p["scale"] + p["bias"]


def _group_norm(p, x, num_groups):
  """GroupNorm of a [B, h, w, D] map: statistics per image over (h, w, the D / num_groups channels of a group)."""
  batch, height, width, dim = x.shape
  grouped = _normalise(x.reshape(batch, height, width, num_groups, dim // num_groups), (1, 2, 4))
  return grouped.reshape(x.shape) * p["scale"] + p["bias"]


def _post_norm_mlp(p, x):
  """LN(x + W2 ReLU(W1 x)) (dropout off)."""
  return _layer_norm(p["LayerNorm_0"], x + _dense(p["Dense_1"], _relu(_dense(p["Dense_0"], x))))


def _relu_norm_mlp(p, x):
  """2 x [Linear -> ReLU -> LayerNorm]."""
  for i in range(2):
    x = _layer_norm(p[f"LayerNorm_{i}"], _relu(_dense(p[f"Dense_{i}"], x)))
  return x


def _anchor_encoder(p, anchors):
  """One MLP per anchor part [xy | rotation | scale | feature], summed, then one more MLP."""
  parts = {"xy": anchors[..., 0:2], "rotation": anchors[..., 2:3], "scale": anchors[..., 3:5],
           "feature": anchors[..., 5:]}
  return _relu_norm_mlp(p["output"], sum(_relu_norm_mlp(p[f"{name}_embed"], part) for name, part in parts.items()))


def _scaled_head(p, x):
  """2 x [Linear -> ReLU -> Linear -> ReLU -> LayerNorm] -> Linear -> times a per-output scale."""
  trunk = p["_RefineTrunk_0"]
  for i in range(2):
    x = _relu(_dense(trunk[f"Dense_{2 * i + 1}"], _relu(_dense(trunk[f"Dense_{2 * i}"], x))))
    x = _layer_norm(trunk[f"LayerNorm_{i}"], x)
  return _dense(p["Dense_0"], x) * p["scale"]


def _multihead_self_attention(p, query_key, value, num_heads):
  """torch.nn.MultiheadAttention: q = (tgt + pos) Wq, k = (tgt + pos) Wk, v = tgt Wv; softmax(q k^T / sqrt(dh))."""
  batch, length, dim = value.shape
  head_dim = dim // num_heads
  w, b = p["in_proj_kernel"], p["in_proj_bias"]
  q, k, v = ((x @ w[:, i * dim:(i + 1) * dim] + b[i * dim:(i + 1) * dim]).reshape(batch, length, num_heads, head_dim)
             for i, x in enumerate((query_key, query_key, value)))
  probs = _numpy_softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim))
  return _dense(p["out_proj"], np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, dim))


def _stack_entry(tree, index):
  """Entry `index` of the module's scanned stacks (blocks, or the layers of an encoder / decoder)."""
  return jax.tree.map(lambda a: a[index], tree)


def numpy_gaussian_embedder(variables, feature_map, sizes):
  """GaussianEmbedder(**sizes)(feature_map, train=False) from the formulas, in float64: a dict of the 4 outputs."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  scale_max = float(variables["range_scheduler"]["scale_max"])
  heads, points = sizes["num_heads"], sizes["num_points"]
  x = np.asarray(feature_map, np.float64)
  batch, height, width, dim = x.shape

  # Lifter: 1x1 projection + GroupNorm; DETR sine embedding; reference points at the pixel centres (x, y).
  src = _group_norm(p["input_norm"], _dense(p["input_proj"], x), sizes["num_groups"]).reshape(batch, -1, dim)
  pos = numpy_detr_sine_embedding(height, width, dim).reshape(1, height * width, dim)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  pixel_refs = np.broadcast_to(np.stack([(cols.ravel() + 0.5) / width, (rows.ravel() + 0.5) / height], -1),
                               (batch, height * width, 2))

  # Encoder: post-norm [deformable self-attention (queries see pos, values do not), MLP] per layer.
  memory = src
  for layer in range(sizes["num_encoder_layers"]):
    lp = _stack_entry(p["encoder"], layer)
    attended = numpy_deformable_attention({"params": lp["self_attn"]}, memory + pos, pixel_refs, memory, height,
                                          width, heads, points)
    memory = _post_norm_mlp(lp["mlp"], _layer_norm(lp["LayerNorm_0"], memory + attended))

  anchors = np.broadcast_to(p["anchors"], (batch,) + p["anchors"].shape)
  instance = np.zeros((batch, anchors.shape[1], dim))
  for block in range(sizes["num_blocks"]):
    bp = _stack_entry(p["blocks"], block)
    anchor_embed = _anchor_encoder(p["anchor_encoder"], anchors)  # one encoder shared by every block
    refs = _sigmoid(anchors[..., :2])
    tgt = instance
    for layer in range(sizes["num_decoder_layers"]):
      lp = _stack_entry(bp["cross_attn"], layer)
      attended = _multihead_self_attention(lp["self_attn"], tgt + anchor_embed, tgt, heads)
      tgt = _layer_norm(lp["LayerNorm_0"], tgt + attended)
      attended = numpy_deformable_attention({"params": lp["cross_attn"]}, tgt + anchor_embed, refs, memory, height,
                                            width, heads, points)
      tgt = _post_norm_mlp(lp["mlp"], _layer_norm(lp["LayerNorm_1"], tgt + attended))
    # Asymmetric FFN on [decoded | previous instance]: LN, then a linear skip plus Linear -> ReLU -> Linear.
    ffn = bp["ffn"]
    normed = _layer_norm(ffn["LayerNorm_0"], np.concatenate([tgt, instance], axis=-1))
    instance = _dense(ffn["identity_fc"], normed) + _dense(ffn["Dense_1"], _relu(_dense(ffn["Dense_0"], normed)))
    # Refinement: the centre logits move by the update, the rest is replaced by it.
    update = _scaled_head(bp["refine"], instance + anchor_embed)
    anchors = np.concatenate([anchors[..., :2] + update[..., :2], update[..., 2:]], axis=-1)

  means = 2.0 * _sigmoid(np.clip(anchors[..., :2], -9.21, 9.21)) - 1.0
  centres = (means + 1.0) / 2.0
  at_centres = numpy_bilinear_sample(memory.reshape(batch, height, width, 1, dim), centres[:, :, None, None, :])
  features = (_scaled_head(p["to_features"], anchors[..., 5:]) +
              _dense(p["centre_to_features"], at_centres.reshape(batch, -1, dim)))
  return {"means": means, "rotations": np.pi * _sigmoid(anchors[..., 2]),
          "scales": 0.1 + (scale_max - 0.1) * _sigmoid(anchors[..., 3:5]), "features": features}


@pytest.fixture(scope="module")
def oracle_case():
  """Perturbed parameters, an input map, output weights, and the module's outputs and input gradient of
  loss = sum over the outputs of <weights, output> (one compile for both)."""
  rng = np.random.default_rng(11)
  # A non-square map: on a square one, swapped heights and widths (in the reference points, say) go unseen.
  feature_map = rng.normal(size=(2, 4, 6, ORACLE_SIZES["embed_dim"])).astype(np.float32)
  params = jax.jit(functools.partial(ORACLE_MODULE.init, train=False))(jax.random.key(12), feature_map)["params"]
  # After init the stacked blocks / layers are identical and several kernels are zero (sampling offsets,
  # attention weights): noise on every entry makes each stack entry distinct, so a wrong stack index, a swapped
  # block order or an input that a zero kernel hides changes the output.
  params = jax.tree.map(lambda a: (np.asarray(a) + 0.2 * rng.normal(size=a.shape)).astype(np.float32), params)
  variables = {"params": params, "range_scheduler": {"scale_max": np.float32(ORACLE_SCALE_MAX),
                                                     "scale_mean": np.float32(2.05)}}
  shapes = {"means": (2, 4, 2), "rotations": (2, 4), "scales": (2, 4, 2), "features": (2, 4, 3)}
  weights = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}

  @jax.jit
  def outputs_and_input_gradient(variables, feature_map, weights):
    def loss(x):
      outputs = {name: getattr(ORACLE_MODULE.apply(variables, x, train=False), name) for name in shapes}
      return sum(jnp.sum(weights[name] * outputs[name]) for name in shapes), outputs

    (_, outputs), grad = jax.value_and_grad(loss, has_aux=True)(feature_map)
    return outputs, grad

  outputs, grad = outputs_and_input_gradient(variables, feature_map, weights)
  return dict(variables=variables, feature_map=feature_map, weights=weights, outputs=outputs, grad=grad)


def test_forward_matches_a_float64_numpy_oracle(oracle_case):
  """Everything from the lifter to the output activations, with distinct random parameters per block and layer.

  The module runs in float32 only: it casts its input to float32 and starts its instance features as a float32
  scan carry (under jax_enable_x64 the carries come out float64 and the scan rejects them). From the same float32
  parameters and input, its difference from the float64 oracle is float32 rounding (u = 6e-8 per operation)
  amplified along ~40 layers in sequence (lifter, 2 encoder layers, 2 blocks of anchor encoder + 2 decoder
  layers + FFN + 6-layer refinement, feature head), most ending in a LayerNorm that divides the error by its
  input's standard deviation. Measured: 1.6e-6 here, <= 5.1e-6 over 12 other parameter draws on this map and
  <= 2e-5 over 12 on a 4 x 4 one; outputs are O(1) (|features| < 6), so an absolute 1e-4 is float32 rounding with
  a 5x margin over the worst draw, while each of the 18 mutations of the module we tried (a non-residual centre,
  a missing positional embedding, a reversed block or layer order, ...) moves some output by 0.1 or more, as
  does swapping height and width in the pixel centres (features by 1.7), which a square map hides.
  """
  expected = numpy_gaussian_embedder(oracle_case["variables"], oracle_case["feature_map"], ORACLE_SIZES)
  for name, value in expected.items():
    got = oracle_case["outputs"][name]
    assert got.shape == value.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=0, atol=1e-4, err_msg=name)
  assert np.std(expected["means"]) > 0.1 and np.std(expected["features"]) > 0.1  # not a degenerate case


def test_input_gradient_matches_finite_differences_of_the_oracle(oracle_case):
  """d loss / d feature_map from the module's own backward pass (float32) against float64 central differences of
  the NumPy forward, along 4 random directions through the whole map and along 4 single entries.

  Differences: step h = 1e-6 on a float64 loss of size ~10 are exact to ~1e-14 / h = 1e-8 (rounding) plus
  h^2 f''' ~ 1e-11 (truncation). The forward has kinks (ReLU at 0, bilinear sampling where a sample crosses a
  pixel-centre line or the map's border, the mean logit's clip); a difference that straddled one would not
  match the half-step difference, which is checked first (they agree to <= 2e-9 of the scale below).
  Gradient: the module's float32 backward carries float32 rounding like the forward; over all 384 entries its
  error is ~1e-6 of |grad| (measured 9.8e-7 against a full finite-difference gradient). By Cauchy-Schwarz the
  error of a directional derivative is then at most ~1e-6 |grad| |d|: 1e-5 |grad| |d| leaves a 10x margin
  (measured <= 1e-7 |grad| |d| on these directions). A stop_gradient on one path (the centre read of the memory,
  or the encoder's attention), which leaves the forward exact, fails here by more than 1e-2 |grad| |d|.
  """
  weights = oracle_case["weights"]
  x0 = np.asarray(oracle_case["feature_map"], np.float64)

  def loss(x):
    outputs = numpy_gaussian_embedder(oracle_case["variables"], x, ORACLE_SIZES)
    return sum(np.sum(weights[name] * value) for name, value in outputs.items())

  def central_difference(direction, step):
    return (loss(x0 + step * direction) - loss(x0 - step * direction)) / (2 * step)

  rng = np.random.default_rng(13)
  directions = [rng.normal(size=x0.shape) for _ in range(4)]
  directions += list(np.eye(x0.size)[rng.choice(x0.size, size=4, replace=False)].reshape(4, *x0.shape))
  grad = np.asarray(oracle_case["grad"], np.float64)
  for i, direction in enumerate(directions):
    scale = np.linalg.norm(grad) * np.linalg.norm(direction)
    expected = central_difference(direction, 1e-6)
    assert abs(expected - central_difference(direction, 5e-7)) < 1e-7 * scale, f"direction {i} crosses a kink"
    got = np.sum(grad * direction)
    assert abs(got - expected) < 1e-5 * scale, f"direction {i}: backward {got}, finite differences {expected}"
