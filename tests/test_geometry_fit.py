"""geometry_fit on a decode whose answer is known: two Gaussians splatted straight onto an 8x8 map (no decoder),
the target rendered from a known geometry. The fit must find that geometry from a start well away from it, keep
the centres and scales inside their bounds, and leave the geometry alone with no steps."""
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


def splat_decode(means, rotations, scales):
  return splatting.splat(means, rotations, scales, FEATURES, height=8, width=8, impl="xla")


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
