"""Tests of the Gaussian embedder: outputs, identical block init, range schedule, position embedding, sizes."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.models.gaussian_embedder import (GaussianEmbedder, Gaussians, anchor_init,
                                                        sine_position_embedding)
from test_deformable_attention import numpy_bilinear_sample

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


def test_the_centre_moves_residually_through_every_block(variables, feature_map):
  """With the refinement head's centre outputs fixed at a bias d (kernel 0), each block adds d to the centre's
  logit: means = 2 sigmoid(anchor_xy + num_blocks * d) - 1, whatever the image. A refinement that replaced the
  centre instead would give 2 sigmoid(d) - 1."""
  params = flax.core.unfreeze(variables["params"])
  head = params["blocks"]["refine"]["Dense_0"]  # stacked over the blocks: kernel [num_blocks, D', 5 + D']
  num_blocks = head["kernel"].shape[0]
  shift = np.array([0.3, -0.2])
  head["kernel"] = head["kernel"].at[..., :2].set(0.0)
  head["bias"] = head["bias"].at[..., :2].set(shift)
  gaussians, _ = _apply({**variables, "params": params}, feature_map, jax.random.key(0), train=False)
  anchors_xy = np.asarray(params["anchors"][:, :2], np.float64)
  step_scale = np.asarray(params["blocks"]["refine"]["scale"][:, :2], np.float64)  # learnable, 1 at init
  logits = anchors_xy + (shift * step_scale).sum(axis=0)
  expected = 2.0 / (1.0 + np.exp(-logits)) - 1.0
  assert num_blocks == 3
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


def test_centre_feature_adds_a_linear_read_of_the_memory_at_each_centre(feature_map):
  """features = feature head + bilinear(memory, centre) @ W + b, checked against float64 NumPy.

  Without the self-attention encoder the memory is the lifter's GroupNorm output, which the module records.
  """
  module = GaussianEmbedder(num_gaussians=NUM_GAUSSIANS, feature_dim=FEATURE_DIM, num_encoder_layers=0)
  variables = module.init(jax.random.key(3), feature_map, train=False)
  gaussians, recorded = module.apply(variables, feature_map, train=False, capture_intermediates=True)
  memory = np.asarray(recorded["intermediates"]["input_norm"]["__call__"][0], np.float64)
  read = variables["params"]["centre_to_features"]
  without_read = flax.core.unfreeze(variables)
  without_read["params"]["centre_to_features"] = jax.tree.map(jnp.zeros_like, read)
  head_only = module.apply(without_read, feature_map, train=False).features

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
    module.init(jax.random.key(0), feature_map, train=False)
