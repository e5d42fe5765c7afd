"""Tests of bilinear_sample and DeformableAttention against float64 NumPy re-implementations of the formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.models.deformable_attention import DeformableAttention, bilinear_sample


def numpy_bilinear_sample(value, locations):
  """grid_sample(align_corners=False, padding zeros) written point by point: pixel coordinate loc * size - 0.5."""
  value = np.asarray(value, np.float64)
  locations = np.asarray(locations, np.float64)
  batch, height, width, heads, head_dim = value.shape
  _, num_queries, _, num_points, _ = locations.shape
  out = np.zeros((batch, num_queries, heads, num_points, head_dim))
  for b, q, h, p in np.ndindex(batch, num_queries, heads, num_points):
    x = locations[b, q, h, p, 0] * width - 0.5
    y = locations[b, q, h, p, 1] * height - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    for yi, wy in ((y0, 1.0 - (y - y0)), (y0 + 1, y - y0)):
      for xi, wx in ((x0, 1.0 - (x - x0)), (x0 + 1, x - x0)):
        if 0 <= xi < width and 0 <= yi < height:
          out[b, q, h, p] += wy * wx * value[b, yi, xi, h]
  return out


def _locations_with_edge_cases(rng, batch, num_queries, heads, num_points, height, width):
  """Random points in [-0.3, 1.3]^2, with some set exactly on map borders, pixel centres and pixel edges."""
  loc = rng.uniform(-0.3, 1.3, size=(batch, num_queries, heads, num_points, 2))
  special_x = [0.0, 1.0, 0.5 / width, 1.0 - 0.5 / width, 1.0 / width, -0.5 / width, 1.0 + 0.5 / width, 2.0]
  special_y = [0.0, 1.0, 0.5 / height, 1.0 - 0.5 / height, 2.0 / height, 1.0 + 0.5 / height, -0.5 / height, -1.0]
  flat = loc.reshape(-1, 2)
  flat[:len(special_x), 0] = special_x
  flat[:len(special_y), 1] = special_y
  return flat.reshape(loc.shape)


_bilinear_sample = jax.jit(bilinear_sample)


def test_bilinear_sample_matches_numpy_including_borders_and_outside():
  rng = np.random.default_rng(0)
  batch, height, width, heads, head_dim, num_queries, num_points = 2, 3, 5, 2, 3, 6, 4
  value = rng.normal(size=(batch, height, width, heads, head_dim))
  locations = _locations_with_edge_cases(rng, batch, num_queries, heads, num_points, height, width)
  got = _bilinear_sample(jnp.asarray(value, jnp.float32), jnp.asarray(locations, jnp.float32))
  assert got.shape == (batch, num_queries, heads, num_points, head_dim)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, numpy_bilinear_sample(value, locations), rtol=1e-5, atol=1e-6)


def test_bilinear_sample_pixel_centres_return_pixels():
  """A published property of align_corners=False: sampling at ((j+0.5)/W, (i+0.5)/H) returns pixel (i, j)."""
  rng = np.random.default_rng(1)
  height, width = 4, 7
  value = rng.normal(size=(1, height, width, 1, 2)).astype(np.float32)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  centres = np.stack([(cols + 0.5) / width, (rows + 0.5) / height], -1).reshape(1, height * width, 1, 1, 2)
  got = bilinear_sample(jnp.asarray(value), jnp.asarray(centres, jnp.float32))
  np.testing.assert_allclose(got.reshape(height, width, 2), value[0, :, :, 0], rtol=1e-6, atol=1e-6)


def test_bilinear_sample_gradients_match_finite_differences():
  rng = np.random.default_rng(2)
  batch, height, width, heads, head_dim, num_queries, num_points = 1, 3, 4, 2, 2, 3, 2
  value = rng.normal(size=(batch, height, width, heads, head_dim))
  # Generic points (away from pixel-centre lines, where the interpolant has kinks), some partly outside.
  locations = rng.uniform(-0.1, 1.1, size=(batch, num_queries, heads, num_points, 2))
  cotangent = rng.normal(size=(batch, num_queries, heads, num_points, head_dim))

  def loss(v, loc):
    return jnp.sum(bilinear_sample(v, loc) * cotangent)

  grad_value, grad_loc = jax.grad(loss, argnums=(0, 1))(jnp.asarray(value, jnp.float32),
                                                        jnp.asarray(locations, jnp.float32))

  def numpy_loss(v, loc):
    return np.sum(numpy_bilinear_sample(v, loc) * cotangent)

  def finite_differences(x, fn, eps):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
      plus, minus = x.copy(), x.copy()
      plus[i] += eps
      minus[i] -= eps
      grad[i] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad

  expected_loc = finite_differences(locations, lambda loc: numpy_loss(value, loc), 1e-6)
  expected_value = finite_differences(value, lambda v: numpy_loss(v, locations), 1e-3)
  assert np.abs(expected_loc).max() > 1.0  # the test points do move the samples
  np.testing.assert_allclose(grad_loc, expected_loc, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_value, expected_value, rtol=1e-4, atol=1e-5)


def _init(module, batch, num_queries, height, width, seed=0):
  query = jnp.zeros((batch, num_queries, module.dim))
  ref = jnp.full((batch, num_queries, 2), 0.5)
  value = jnp.zeros((batch, height * width, module.dim))
  return jax.jit(lambda *args: module.init(*args, (height, width)))(jax.random.key(seed), query, ref, value)


@pytest.mark.parametrize("num_heads", [4, 8])
def test_initial_sampling_locations_are_the_grid_and_the_reference_point(num_heads):
  module = DeformableAttention(dim=64, num_heads=num_heads, num_points=4)
  height, width = 5, 8
  params = _init(module, 2, 3, height, width)
  rng = np.random.default_rng(3)
  query = rng.normal(size=(2, 3, 64)).astype(np.float32)
  ref = rng.uniform(size=(2, 3, 2)).astype(np.float32)
  locations, weights = jax.jit(lambda *args: module.apply(*args, (height, width),
                                                          method=DeformableAttention.sampling_locations))(
      params, query, ref)
  assert locations.shape == (2, 3, num_heads, 5, 2) and weights.shape == (2, 3, num_heads, 5)

  if num_heads == 4:  # Deformable-DETR's published directions for 4 heads
    directions = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  else:  # the formula: (cos, sin) of 2 pi k / heads over its larger absolute component
    angles = 2 * np.pi * np.arange(num_heads) / num_heads
    directions = np.stack([np.cos(angles), np.sin(angles)], -1)
    directions /= np.abs(directions).max(-1, keepdims=True)
  # Point 0: the reference point itself; point i >= 1: i pixels along the head's direction.
  offsets_px = np.concatenate([np.zeros((num_heads, 1, 2)),
                               directions[:, None, :] * np.arange(1, 5)[None, :, None]], axis=1)
  expected = ref[:, :, None, None, :] + offsets_px[None, None] / np.array([width, height])
  np.testing.assert_allclose(locations, expected, atol=1e-6)
  np.testing.assert_allclose(weights, np.full(weights.shape, 0.2), atol=1e-7)


def _numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def numpy_deformable_attention(params, query, ref, value, height, width, num_heads, num_points):
  """The MSDA forward from its formulas, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  dense = lambda x, name: x @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
  batch, num_queries, dim = query.shape
  head_dim = dim // num_heads
  values = dense(value, "value_proj").reshape(batch, height, width, num_heads, head_dim)
  offsets = dense(query, "sampling_offsets").reshape(batch, num_queries, num_heads, num_points, 2)
  offsets = np.concatenate([np.zeros((batch, num_queries, num_heads, 1, 2)), offsets], axis=3)
  weights = _numpy_softmax(dense(query, "attention_weights").reshape(batch, num_queries, num_heads, num_points + 1))
  locations = ref[:, :, None, None, :] + offsets / np.array([width, height])
  samples = numpy_bilinear_sample(values, locations)
  attended = (weights[..., None] * samples).sum(axis=3).reshape(batch, num_queries, dim)
  return dense(attended, "output_proj")


def test_deformable_attention_matches_numpy_with_random_parameters():
  num_heads, num_points, dim, height, width, batch, num_queries = 2, 3, 16, 3, 5, 2, 4
  module = DeformableAttention(dim=dim, num_heads=num_heads, num_points=num_points)
  params = _init(module, batch, num_queries, height, width)
  # Non-zero weights everywhere, with offsets of a few pixels so samples also fall outside the map.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = jax.tree.unflatten(treedef, [leaf + 0.5 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])
  rng = np.random.default_rng(5)
  query = rng.normal(size=(batch, num_queries, dim))
  ref = rng.uniform(size=(batch, num_queries, 2))
  value = rng.normal(size=(batch, height * width, dim))
  got = module.apply(params, *(jnp.asarray(a, jnp.float32) for a in (query, ref, value)), (height, width))
  expected = numpy_deformable_attention(params, query, ref, value, height, width, num_heads, num_points)
  assert got.shape == (batch, num_queries, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
