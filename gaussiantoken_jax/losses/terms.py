"""The reference's loss terms as pure jnp functions.

How the reference combines them, per training step on the same reconstruction x_hat:

  generator:      l1_loss(x, x_hat) + 1.0 * mean(lpips_distance(x, x_hat))
                  + w_gan * [epoch >= 5] * generator_gan_loss(D(x_hat)) + 0.25 * commitment
                  where w_gan is fixed at 0.1 (the VQGAN adaptive weight, `adaptive_gan_weight(...) * 0.8`,
                  is an option the reference leaves switched off);
  discriminator:  ema_real = update_lecam_ema(ema_real, D(x))           # the EMAs are updated first, then
                  ema_fake = update_lecam_ema(ema_fake, D(x_hat))       # used by this same step's LeCAM term
                  discriminator_hinge_loss(D(x), D(x_hat)) + 0.05 * lecam_loss(D(x), D(x_hat), ema_real, ema_fake)
                  with x_hat under stop_gradient.

The LeCAM EMAs (decay 0.999, initialised to 0) are state the trainer carries. In the reference they are
per-GPU Python floats, never saved; here they are means over the global batch and belong in the checkpoint, so
that a resumed run continues exactly.

Every function computes in float32 whatever its inputs' dtype and returns a float32 scalar.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """mean |x - y| over every element (the reference's pixel reconstruction term; it has no L2 term)."""
  if tuple(x.shape) != tuple(y.shape):
    raise ValueError(f"l1_loss: `x` and `y` must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def generator_gan_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating generator loss: mean_b softplus(-mean_patches D(x_hat)_b).

  That is BCE with label 1 on each image's mean PatchGAN logit (not on each patch), as in the reference.

  Args:
    fake_logits: discriminator logits of the reconstructions, [B, ...] (the PatchGAN map [B, h, w, 1]).
  """
  per_image = jnp.mean(fake_logits.astype(jnp.float32), axis=tuple(range(1, fake_logits.ndim)))
  return jnp.mean(jax.nn.softplus(-per_image))


def discriminator_hinge_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), means over all patches and images."""
  real_term = jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
  fake_term = jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32)))
  return 0.5 * (real_term + fake_term)


def update_lecam_ema(ema: jax.Array, logits: jax.Array, decay: float = 0.999) -> jax.Array:
  """decay * ema + (1 - decay) * mean(logits), without gradient (the EMAs are constants to the loss).

  Call it for both EMAs before `lecam_loss` in each discriminator step (see the module docstring).
  """
  if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
    raise ValueError(f"update_lecam_ema: `decay` must be a float in [0, 1], got {decay!r}.")
  mean_logit = jnp.mean(logits.astype(jnp.float32))
  return jax.lax.stop_gradient(decay * ema.astype(jnp.float32) + (1.0 - decay) * mean_logit)


def lecam_loss(real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array,
               ema_fake: jax.Array) -> jax.Array:
  """LeCAM regulariser: mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_hat))^2.

  Args:
    real_logits, fake_logits: discriminator logits [B, ...] of real images and of reconstructions.
    ema_real, ema_fake: scalar EMAs of the mean real and fake logits, already updated with this step's logits.
  """
  ema_real = jax.lax.stop_gradient(ema_real.astype(jnp.float32))
  ema_fake = jax.lax.stop_gradient(ema_fake.astype(jnp.float32))
  real_term = jnp.mean(jnp.square(jax.nn.relu(real_logits.astype(jnp.float32) - ema_fake)))
  fake_term = jnp.mean(jnp.square(jax.nn.relu(ema_real - fake_logits.astype(jnp.float32))))
  return real_term + fake_term


def _global_norm(leaves: list[jax.Array]) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def adaptive_gan_weight(rec_grads: Any, gan_grads: Any, eps: float = 1e-4, max_weight: float = 1e4) -> jax.Array:
  """VQGAN's adaptive adversarial weight: clip(||g_rec|| / (||g_gan|| + eps), 0, max_weight), no gradient.

  Taming multiplies this by its `disc_weight` (0.8 in the reference config, where it is unused because the
  weight is fixed at 0.1); that factor is the caller's.

  Args:
    rec_grads: gradients of the reconstruction loss (L1 + LPIPS) w.r.t. the decoder's last layer (a pytree).
    gan_grads: gradients of the generator GAN loss w.r.t. the same parameters (same tree structure and shapes).
    eps: added to the GAN gradient norm; max_weight: upper clip.
  """
  function = "adaptive_gan_weight"
  rec_structure = jax.tree_util.tree_structure(rec_grads)
  gan_structure = jax.tree_util.tree_structure(gan_grads)
  if rec_structure != gan_structure:
    raise ValueError(f"{function}: `rec_grads` and `gan_grads` must have the same tree structure, got "
                     f"{rec_structure} and {gan_structure}.")
  rec_leaves = jax.tree_util.tree_leaves(rec_grads)
  gan_leaves = jax.tree_util.tree_leaves(gan_grads)
  if not rec_leaves:
    raise ValueError(f"{function}: `rec_grads` must be a non-empty pytree of gradient arrays, got {rec_grads!r}.")
  for rec_leaf, gan_leaf in zip(rec_leaves, gan_leaves):
    if tuple(rec_leaf.shape) != tuple(gan_leaf.shape):
      raise ValueError(f"{function}: `rec_grads` and `gan_grads` leaves must have equal shapes, got "
                       f"{tuple(rec_leaf.shape)} and {tuple(gan_leaf.shape)}.")
  if not eps > 0 or not max_weight > 0:
    raise ValueError(f"{function}: `eps` and `max_weight` must be positive, got {eps!r} and {max_weight!r}.")
  weight = _global_norm(rec_leaves) / (_global_norm(gan_leaves) + eps)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
