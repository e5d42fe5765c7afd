"""geometry_fit on a decode whose answer is known: two Gaussians splatted straight onto an 8x8 map (no decoder),
the target rendered from a known geometry. The fit must find that geometry from a start well away from it, keep
the centres and scales inside their bounds, leave the geometry alone with no steps, and follow Adam with its
per-image step halving and best-point return, written out in float64 here."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax import geometry_fit, splatting

FEATURES = jnp.array([[[1.0, 0.2, -0.5], [-0.8, 0.6, 0.3]]])  # [B=1, K=2, C=3]
TRUE = (jnp.array([[[-0.3, 0.2], [0.4, -0.25]]]),  # centres in [-1, 1]
        jnp.array([[0.5, 1.2]]),  # rotations; anisotropic scales make them identifiable (modulo pi)
        jnp.array([[[0.9, 1.8], [1.5, 0.7]]]))  # scales in pixels
START = (TRUE[0] + jnp.array([[[0.15, -0.1], [-0.12, 0.1]]]), TRUE[1] + 0.25, TRUE[2] * 1.3)


def splat_decode(means, rotations, scales):  # every image of the batch carries FEATURES
  features = jnp.broadcast_to(FEATURES, means.shape[:1] + FEATURES.shape[1:])
  return splatting.splat(means, rotations, scales, features, height=8, width=8, impl="xla")


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "scale_bounds"))
def fit(start, target, *, steps, learning_rate=0.05, scale_bounds=(0.1, 3.0)):
  return geometry_fit.fit_geometry(splat_decode, *start, target, steps=steps, learning_rate=learning_rate,
                                   scale_bounds=scale_bounds)


def test_the_fit_recovers_the_geometry_that_rendered_the_target():
  fitted = fit(START, splat_decode(*TRUE), steps=100)
  # Starting 0.15 / 0.25 rad / 0.54 px away, 100 steps end within 1e-4 to 5e-4 (measured); the schedule's last
  # steps are ~1e-4 long, so 2e-3 is a loose bound that a fit in the wrong direction (or not at all) cannot meet.
  for name, got, want, start in zip(("means", "rotations", "scales"), fitted, TRUE, START):
    assert float(jnp.max(jnp.abs(start - want))) > 0.1, name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3, err_msg=name)


def test_centres_and_scales_stay_in_their_bounds():
  # The target's first Gaussian sits past the right edge (x = 1.3) and is wider (2.5 px) than the bound allows.
  true = (TRUE[0].at[0, 0, 0].set(1.3), TRUE[1], TRUE[2].at[0, 0].set(2.5))
  start = (TRUE[0].at[0, 0, 0].set(0.8), TRUE[1], TRUE[2].at[0, 0].set(1.5))
  means, _, scales = fit(start, splat_decode(*true), steps=100, scale_bounds=(0.5, 2.0))
  assert float(jnp.max(jnp.abs(means))) <= 1.0 and float(jnp.min(scales)) >= 0.5
  # Pushed to the edge and to the largest scale, and held there.
  assert float(means[0, 0, 0]) == 1.0 and float(jnp.max(scales[0, 0])) == 2.0


def test_no_steps_leave_the_geometry_unchanged():
  fitted = geometry_fit.fit_geometry(splat_decode, *START, splat_decode(*TRUE), steps=0, learning_rate=0.05,
                                     scale_bounds=(0.1, 3.0))
  for got, want in zip(fitted, START):
    assert got is want


def test_bad_steps_or_learning_rate_are_refused():
  args = (splat_decode, *START, splat_decode(*TRUE))
  for steps in (-1, 2.5, True):
    with pytest.raises(ValueError, match=rf"fit_geometry: `steps` must be a non-negative int, got {steps!r}"):
      geometry_fit.fit_geometry(*args, steps=steps, learning_rate=0.05, scale_bounds=(0.1, 3.0))
  for rate in (0.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match=rf"fit_geometry: `learning_rate` must be positive and finite, got {rate!r}"):
      geometry_fit.fit_geometry(*args, steps=3, learning_rate=rate, scale_bounds=(0.1, 3.0))


def test_three_steps_are_adam_on_a_cosine_schedule():
  """The fit's trajectory against Adam written out in float64 (optax's defaults b1 0.9, b2 0.999, eps 1e-8) with
  the learning rate lr * (1 + cos(pi t / steps)) / 2 at step t, on gradients of the objective written here. A
  step too few, another learning rate or schedule, or a reset moment estimate gives another point."""
  target = splat_decode(*TRUE)

  def loss(geometry):  # the fit's objective: per-image mean absolute error, summed over images
    return jnp.sum(jnp.mean(jnp.abs(splat_decode(*geometry) - target), axis=(1, 2, 3)))

  gradient = jax.jit(jax.grad(loss))
  steps, lr = 3, 0.01
  point = [np.asarray(x, np.float64) for x in START]
  m = [np.zeros_like(x) for x in point]
  v = [np.zeros_like(x) for x in point]
  for t in range(steps):
    grads = gradient(tuple(jnp.asarray(x, jnp.float32) for x in point))
    rate = lr * 0.5 * (1.0 + np.cos(np.pi * t / steps))
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.999 * v[i] + 0.001 * g * g
      point[i] = point[i] - rate * (m[i] / (1 - 0.9 ** (t + 1))) / (np.sqrt(v[i] / (1 - 0.999 ** (t + 1))) + 1e-8)
  # Centres stay inside [-1, 1] and scales inside (0.1, 3.0) along the way, so the clips are no-ops here.
  fitted = fit(START, target, steps=steps, learning_rate=lr)
  for name, got, want, start in zip(("means", "rotations", "scales"), fitted, point, START):
    # Each step moves a coordinate by at most ~lr (Adam), and a step's gradient is float32 (~1e-6 relative): the
    # two trajectories agree to ~1e-7; 2e-6 also allows float32 rounding of coordinates <= 3. The fit must have
    # moved by far more (~lr) than that.
    assert float(jnp.min(jnp.abs(np.asarray(got) - np.asarray(start)))) > 1e-3, name
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6, err_msg=name)


def reference_fit(start, target, *, steps, lr, bounds=(0.1, 3.0)):
  """The fit written out in float64 NumPy from its docstring: Adam (optax's defaults) on the cosine schedule, each
  image's step scaled by 2^-(its rejections so far); a step that raised an image's loss above its best is rejected
  (the image goes back to its best point, its scale halves); the result is each image's lowest-loss point among
  the start, every step's point and the last one. The losses and gradients are the float32 objective's.
  Returns (result, rejections per image, the smallest gap between a compared loss and the best, relative)."""
  def losses_of(point):
    decoded = splat_decode(*(jnp.asarray(x, jnp.float32) for x in point))
    return np.asarray(jnp.mean(jnp.abs(decoded - target), axis=(1, 2, 3)), np.float64)

  gradient = jax.jit(jax.grad(lambda g: jnp.sum(jnp.mean(jnp.abs(splat_decode(*g) - target), axis=(1, 2, 3)))))
  expand = lambda flags, x: flags.reshape(flags.shape + (1,) * (x.ndim - 1))
  point = [np.asarray(x, np.float64) for x in start]
  m, v = [np.zeros_like(x) for x in point], [np.zeros_like(x) for x in point]
  best, best_losses = [x.copy() for x in point], np.full(len(point[0]), np.inf)
  scale, rejections, gap = np.ones(len(point[0])), np.zeros(len(point[0]), int), np.inf

  def keep_lower(losses):
    nonlocal gap
    # A reverted point is scored again and ties its best exactly (same input, same float32 output): no margin needed.
    compared = np.isfinite(best_losses) & (losses != best_losses)
    if compared.any():
      gap = min(gap, float(np.min(np.abs(losses - best_losses)[compared] / losses[compared])))
    lower = losses < best_losses
    best_losses[lower] = losses[lower]
    for b, x in zip(best, point):
      b[lower] = x[lower]

  for t in range(steps):
    losses = losses_of(point)
    grads = [np.asarray(g, np.float64) for g in gradient(tuple(jnp.asarray(x, jnp.float32) for x in point))]
    worse = losses > best_losses
    scale[worse] *= 0.5
    rejections += worse
    keep_lower(losses)
    rate = lr * 0.5 * (1.0 + np.cos(np.pi * t / steps))
    for i, g in enumerate(grads):
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.999 * v[i] + 0.001 * g * g
      step = rate * (m[i] / (1 - 0.9 ** (t + 1))) / (np.sqrt(v[i] / (1 - 0.999 ** (t + 1))) + 1e-8)
      point[i] = point[i] - expand(scale, step) * step
    point[0], point[2] = np.clip(point[0], -1.0, 1.0), np.clip(point[2], *bounds)
    for i in range(3):
      point[i] = np.where(expand(worse, point[i]), best[i], point[i])
  keep_lower(losses_of(point))
  return best, rejections, gap


def test_the_fit_halves_an_images_step_after_a_rise_and_returns_its_best_point():
  """Two images, fitted together at a learning rate large enough to overshoot: the first starts at the truth (loss 0,
  so every step away is rejected, each time with half the step, and the start comes back exactly), the second away
  from it (some steps rejected, some not). The fit must match the float64 reference step for step, image by image."""
  target = jnp.concatenate([splat_decode(*TRUE)] * 2)
  start = tuple(jnp.concatenate([t, s]) for t, s in zip(TRUE, START))
  steps, lr = 7, 0.3  # odd: the first image's last step is taken, and only the final scoring rejects it
  want, rejections, gap = reference_fit(start, target, steps=steps, lr=lr)
  # The case this test is for: the first image's every other step (the one after a revert starts from its best
  # again) is rejected, the second's some; and no compared loss is within float32 rounding of the best (the
  # objective's error is ~1e-6 relative), so the float32 fit must make the same choices as the reference.
  assert rejections[0] == steps // 2 and 0 < rejections[1] < steps // 2, rejections
  assert gap > 1e-4, gap
  fitted = fit(start, target, steps=steps, learning_rate=lr)
  for name, got, expected, begin in zip(("means", "rotations", "scales"), fitted, want, start):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(begin[0]), err_msg=name)
    assert float(jnp.min(jnp.abs(got[1] - begin[1]))) > 1e-3, name
    # Up to 7 steps of up to lr = 0.3, each carrying the float32 gradient's ~1e-6 relative error into Adam's
    # direction: ~2.4e-6 at most; 1e-5 allows 4x that, while a wrong halving, revert or choice moves by ~0.01-0.1.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5, err_msg=name)
