"""Loss terms against float64 NumPy versions of the reference formulas (reference spec section 2.7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.losses import (adaptive_gan_weight, discriminator_hinge_loss, generator_gan_loss, l1_loss,
                                      lecam_loss, update_lecam_ema)


def _np_softplus(z):
  return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  # PatchGAN-shaped maps [B, h, w, 1]; a spread that puts values on both sides of the hinge margins +-1.
  real = rng.normal(0.5, 1.5, size=(4, 3, 3, 1)).astype(np.float32)
  fake = rng.normal(-0.5, 1.5, size=(4, 3, 3, 1)).astype(np.float32)
  return real, fake


def test_l1_loss_matches_numpy():
  rng = np.random.default_rng(1)
  x, y = rng.uniform(-1, 1, size=(2, 2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(l1_loss(x, y), np.mean(np.abs(x.astype(np.float64) - y)), rtol=1e-6)


def test_generator_gan_loss_matches_numpy_and_gradient(logits):
  _, fake = logits
  per_image = fake.astype(np.float64).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(generator_gan_loss(fake), _np_softplus(-per_image).mean(), rtol=1e-6)
  # d/dD softplus(-m_b) / B with m_b = mean over P patches: -sigmoid(-m_b) / (B * P), the same for every patch.
  batch, patches = fake.shape[0], np.prod(fake.shape[1:])
  expected_grad = -1.0 / (1.0 + np.exp(per_image)) / (batch * patches)
  np.testing.assert_allclose(jax.grad(generator_gan_loss)(fake),
                             np.broadcast_to(expected_grad[:, None, None, None], fake.shape), rtol=1e-5)
  # Per-image mean before the softplus, not per-patch BCE: the two differ for spread-out logits.
  assert abs(float(generator_gan_loss(fake)) - _np_softplus(-fake.astype(np.float64)).mean()) > 1e-3


def test_discriminator_hinge_loss_matches_numpy(logits):
  real, fake = logits
  real64, fake64 = real.astype(np.float64), fake.astype(np.float64)
  expected = 0.5 * (np.maximum(1 - real64, 0).mean() + np.maximum(1 + fake64, 0).mean())
  np.testing.assert_allclose(discriminator_hinge_loss(real, fake), expected, rtol=1e-6)


def test_lecam_sequence_matches_numpy(logits):
  """Three discriminator steps in the reference's order: update both EMAs, then the LeCAM term with them."""
  real, fake = logits
  ema_real_np = ema_fake_np = 0.0
  ema_real, ema_fake = jnp.float32(0.0), jnp.float32(0.0)
  for step in range(3):
    real_step, fake_step = real + step, fake - step  # Different logits each step.
    ema_real_np = 0.9 * ema_real_np + 0.1 * real_step.astype(np.float64).mean()
    ema_fake_np = 0.9 * ema_fake_np + 0.1 * fake_step.astype(np.float64).mean()
    ema_real = update_lecam_ema(ema_real, real_step, decay=0.9)
    ema_fake = update_lecam_ema(ema_fake, fake_step, decay=0.9)
    np.testing.assert_allclose([ema_real, ema_fake], [ema_real_np, ema_fake_np], rtol=1e-6, atol=1e-7)
    expected = (np.square(np.maximum(real_step.astype(np.float64) - ema_fake_np, 0)).mean()
                + np.square(np.maximum(ema_real_np - fake_step.astype(np.float64), 0)).mean())
    np.testing.assert_allclose(lecam_loss(real_step, fake_step, ema_real, ema_fake), expected, rtol=1e-5)


def test_lecam_treats_emas_as_constants(logits):
  real, fake = logits
  grad_emas = jax.grad(lecam_loss, argnums=(2, 3))(real, fake, jnp.float32(0.3), jnp.float32(-0.2))
  np.testing.assert_array_equal(grad_emas, [0.0, 0.0])
  assert float(jax.grad(lambda e: update_lecam_ema(e, real))(jnp.float32(0.5))) == 0.0


def test_adaptive_gan_weight_by_hand():
  rec = {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0])}  # ||g_rec|| = 5
  gan = {"kernel": jnp.array([[0.0, 0.6]]), "bias": jnp.array([0.8])}  # ||g_gan|| = 1
  np.testing.assert_allclose(adaptive_gan_weight(rec, gan), 5.0 / (1.0 + 1e-4), rtol=1e-6)
  # A vanishing GAN gradient hits the clip: 5 / (0 + 1e-4) = 5e4 -> 1e4.
  zero_gan = jax.tree_util.tree_map(jnp.zeros_like, gan)
  np.testing.assert_allclose(adaptive_gan_weight(rec, zero_gan), 1e4, rtol=1e-6)
  np.testing.assert_allclose(adaptive_gan_weight(rec, zero_gan, eps=1.0, max_weight=1e6), 5.0, rtol=1e-6)
  # No gradient flows through the weight (VQGAN detaches it).
  assert float(jax.grad(lambda s: adaptive_gan_weight(jax.tree_util.tree_map(lambda g: s * g, rec), gan))(2.0)) == 0


@pytest.mark.parametrize("call, message", [
    (lambda: l1_loss(jnp.zeros((2, 4)), jnp.zeros((2, 5))), "same shape"),
    (lambda: update_lecam_ema(jnp.float32(0), jnp.zeros((2, 3)), decay=1.5), "`decay` must be"),
    (lambda: adaptive_gan_weight({"w": jnp.ones(2)}, {"v": jnp.ones(2)}), "same tree structure"),
    (lambda: adaptive_gan_weight({"w": jnp.ones(2)}, {"w": jnp.ones(3)}), "equal shapes"),
    (lambda: adaptive_gan_weight({}, {}), "non-empty"),
    (lambda: adaptive_gan_weight({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, eps=0.0), "must be positive"),
])
def test_bad_input_raises(call, message):
  with pytest.raises(ValueError, match=message):
    call()
