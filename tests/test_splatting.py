"""splat(): values and gradients against a float64 NumPy implementation written here from the formula.

The reference below builds Sigma = R diag(s)^2 R^T explicitly and inverts it with np.linalg.inv, a different
route from the code under test (which rotates the offset into the Gaussian's frame).
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax import splat

CUTOFF = 1.0 / 255.0


def splat_np(means, rotations, scales, features, height, width, cutoff=CUTOFF):
  """float64 formula: out[b,i,j] = sum_k w * f, w = exp(-0.5 d^T Sigma^-1 d), zeroed below cutoff."""
  b_size, k_size = rotations.shape
  out = np.zeros((b_size, height, width, features.shape[-1]))
  py, px = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
  for b in range(b_size):
    for k in range(k_size):
      t = rotations[b, k]
      rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
      sigma = rot @ np.diag(scales[b, k] ** 2) @ rot.T
      prec = np.linalg.inv(sigma)
      centre = ((means[b, k, 0] + 1) / 2 * width, (means[b, k, 1] + 1) / 2 * height)
      d = np.stack([px - centre[0], py - centre[1]], -1)
      w = np.exp(-0.5 * np.einsum("hwi,ij,hwj->hw", d, prec, d))
      w = np.where(w < cutoff, 0.0, w)
      out[b] += w[..., None] * features[b, k]
  return out


def random_gaussians(seed, b, k, c, dtype=np.float32):
  rng = np.random.default_rng(seed)
  means = rng.uniform(-1.1, 1.1, (b, k, 2))  # a few centres just off the map
  rotations = rng.uniform(-4.0, 4.0, (b, k))
  scales = rng.uniform(0.4, 3.0, (b, k, 2))
  features = rng.normal(size=(b, k, c))
  return tuple(a.astype(dtype) for a in (means, rotations, scales, features))


SHAPES = [  # (B, K, H, W, C)
    (2, 5, 8, 8, 3),
    (1, 1, 7, 5, 1),  # one Gaussian, non-square map, one channel
    (3, 16, 6, 11, 4),
]


@functools.lru_cache(maxsize=None)
def jitted_splat(height, width, impl="xla"):
  return jax.jit(functools.partial(splat, height=height, width=width, impl=impl))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_formula(shape):
  b, k, h, w, c = shape
  args = random_gaussians(0, b, k, c)
  got = np.asarray(jitted_splat(h, w)(*args))
  want = splat_np(*[a.astype(np.float64) for a in args], h, w)
  assert got.shape == (b, h, w, c) and got.dtype == np.float32
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, np.max(np.abs(want)))


def test_cutoff_zeroes_small_weights():
  # One Gaussian with unit feature: every output value is a weight, so none may lie in (0, cutoff).
  means, rotations, scales, _ = random_gaussians(1, 1, 1, 1)
  out = np.asarray(jitted_splat(16, 16)(means, rotations, scales, np.ones((1, 1, 1), np.float32)))
  assert np.all((out == 0) | (out >= CUTOFF * (1 - 1e-6)))
  assert np.any(out == 0) and np.any(out > 0.5)


def test_a_zero_cutoff_keeps_every_weight():
  """cutoff = 0 is allowed (the range is [0, 1)) and then nothing is zeroed: the float64 formula without a cutoff."""
  args = random_gaussians(7, 1, 3, 2)
  got = np.asarray(splat(*args, height=6, width=5, cutoff=0.0, impl="xla"))
  want = splat_np(*[a.astype(np.float64) for a in args], 6, 5, cutoff=0.0)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  assert np.linalg.norm(splat_np(*[a.astype(np.float64) for a in args], 6, 5) - want) > 1e-3 * np.linalg.norm(want)


def _finite_difference_grads(args64, cotangent, h, w, eps=1e-6):
  """Central differences of sum(cotangent * splat_np(...)) for every element of every input."""
  grads = []
  for i, a in enumerate(args64):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      plus = [x.copy() for x in args64]
      minus = [x.copy() for x in args64]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      g[idx] = (np.sum(cotangent * splat_np(*plus, h, w)) - np.sum(cotangent * splat_np(*minus, h, w))) / (2 * eps)
    grads.append(g)
  return grads


@pytest.mark.parametrize("shape", [(2, 3, 6, 7, 2), (1, 1, 5, 4, 1)])
def test_gradients_match_finite_differences(shape):
  b, k, h, w, c = shape
  args = random_gaussians(2, b, k, c)
  # Keep centres on the map so every Gaussian contributes, and check that no weight sits so close to the
  # cutoff that a finite-difference step would cross it (the masked output is discontinuous there).
  args = (np.clip(args[0], -0.8, 0.8),) + args[1:]
  args64 = [a.astype(np.float64) for a in args]
  cotangent = np.random.default_rng(3).normal(size=(b, h, w, c))
  one_hot = np.broadcast_to(np.eye(k), (b, k, k))  # channel k of the output is Gaussian k's weight map
  weights = splat_np(args64[0], args64[1], args64[2], one_hot, h, w, cutoff=0.0)
  assert np.all(np.abs(weights - CUTOFF) > 1e-4)

  loss = lambda *a: jnp.sum(jnp.asarray(cotangent, jnp.float32) * splat(*a, height=h, width=w, impl="xla"))
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  want = _finite_difference_grads(args64, cotangent, h, w)
  for name, g, fd in zip(("means", "rotations", "scales", "features"), got, want):
    rel = np.linalg.norm(np.asarray(g, np.float64) - fd) / np.linalg.norm(fd)
    assert rel < 1e-3, f"{name}: relative error {rel:.2e}"


def test_rotation_symmetries():
  means, rotations, scales, features = random_gaussians(4, 2, 6, 3)
  f = jitted_splat(9, 12)
  base = np.asarray(f(means, rotations, scales, features))
  turned = np.asarray(f(means, rotations + np.float32(np.pi), scales, features))
  swapped = np.asarray(f(means, rotations + np.float32(np.pi / 2), scales[..., ::-1], features))
  np.testing.assert_allclose(turned, base, atol=1e-5)
  np.testing.assert_allclose(swapped, base, atol=1e-5)
  # An anisotropic Gaussian rotated by pi/2 WITHOUT swapping its scales is a different picture.
  assert np.max(np.abs(np.asarray(f(means, rotations + np.float32(np.pi / 2), scales, features)) - base)) > 1e-2


def test_output_dtype_follows_features_and_computes_in_float32():
  args = random_gaussians(5, 1, 4, 2)
  out16 = splat(*(jnp.asarray(a, jnp.bfloat16) for a in args), height=5, width=5, impl="xla")
  assert out16.dtype == jnp.bfloat16 and out16.shape == (1, 5, 5, 2)
  out32 = splat(*args, height=5, width=5, impl="xla")
  args_rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in args]
  # The same float32 computation on the same (rounded) values, then one bfloat16 rounding of the output: at most
  # half a bfloat16 ulp, 2^-8 relative; 2^-7 leaves room for float32 differences between the two programs. Geometry
  # computed in bfloat16 instead (2^-9 relative errors in the centre, 1/s, cos, sin) moves weights by percents.
  np.testing.assert_allclose(np.asarray(out16, np.float32),
                             np.asarray(splat(*args_rounded, height=5, width=5), np.float32), rtol=2 ** -7, atol=1e-6)
  assert out32.dtype == jnp.float32


@pytest.mark.parametrize("bad, match", [
    (dict(means=np.zeros((2, 3, 3), np.float32)), r"`means` must have shape \[B, K, 2\], got shape \(2, 3, 3\)"),
    (dict(means=np.zeros((3, 2), np.float32)), r"`means` must have shape \[B, K, 2\]"),
    (dict(rotations=np.zeros((2, 4), np.float32)), r"`rotations` must share the leading \[B, K\] = \[2, 3\]"),
    (dict(scales=np.zeros((2, 3), np.float32)), r"`scales` must have shape \[B, K, 2\]"),
    (dict(features=np.zeros((1, 3, 4), np.float32)), r"`features` must share the leading"),
    (dict(features=np.zeros((2, 3, 4), np.int32)), r"`features` must be a floating-point array, got dtype int32"),
    (dict(features=np.zeros((2, 3, 4), np.complex64)), r"`features` must be a floating-point array, got dtype complex"),
    (dict(scales=np.ones((2, 4, 2), np.float32)), r"`scales` must share the leading \[B, K\] = \[2, 3\]"),
    (dict(height=0), r"`height` must be a positive Python int, got 0"),
    (dict(height=True), r"`height` must be a positive Python int, got True"),
    (dict(width=4.0), r"`width` must be a positive Python int"),
    (dict(cutoff=1.5), r"`cutoff` must be a float in \[0, 1\)"),
    (dict(cutoff=1.0), r"`cutoff` must be a float in \[0, 1\)"),  # would keep no weight but a centre's
    (dict(cutoff=True), r"`cutoff` must be a float in \[0, 1\)"),
    (dict(impl="cuda"), r"`impl` must be one of"),
    (dict(means=np.zeros((2, 0, 2), np.float32), rotations=np.zeros((2, 0), np.float32),
          scales=np.ones((2, 0, 2), np.float32), features=np.zeros((2, 0, 4), np.float32)),
     r"needs at least one Gaussian and one feature channel, got K = 0 and C = 4"),
    (dict(features=np.zeros((2, 3, 0), np.float32)), r"got K = 3 and C = 0"),
])
def test_bad_input_raises_clear_value_error(bad, match):
  kwargs = dict(means=np.zeros((2, 3, 2), np.float32), rotations=np.zeros((2, 3), np.float32),
                scales=np.ones((2, 3, 2), np.float32), features=np.zeros((2, 3, 4), np.float32),
                height=4, width=4)
  kwargs.update(bad)
  with pytest.raises(ValueError, match=match):
    splat(**kwargs)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_an_empty_batch_numpy_scalars_and_float64_inputs(impl):
  """B = 0 gives an empty map (no kernel launch with an empty grid); a NumPy cutoff is a float like any other;
  float64 NumPy inputs give float32 without JAX's truncation warning (x64 is off)."""
  empty = [np.zeros((0, 3, 2)), np.zeros((0, 3)), np.ones((0, 3, 2)), np.zeros((0, 3, 4))]
  out = splat(*(a.astype(np.float32) for a in empty), height=4, width=5, impl=impl)
  assert out.shape == (0, 4, 5, 4) and out.dtype == jnp.float32
  args = random_gaussians(6, 2, 5, 3)
  want = splat(*args, height=4, width=5, impl=impl)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = splat(*(a.astype(np.float64) for a in args), height=4, width=5, cutoff=np.float32(1 / 255), impl=impl)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
