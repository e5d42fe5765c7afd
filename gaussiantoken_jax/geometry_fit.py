"""Fitting each image's Gaussian geometry to the image itself at encode time.

A GaussianToken token is a codebook index plus a continuous geometry (centre, rotation, scales). The embedder
predicts that geometry in one forward pass; trained on the CPU demo it puts the Gaussians in nearly the same
layout for every image, and the image lives in the codes alone (docs/training.md). Because the geometry is
continuous and the splat and decoder are differentiable, an encoder can instead refine it against the image it
is encoding: a few Adam steps on that image's L1 reconstruction error, with the codes, the codebook and the
decoder fixed. A plain-VQ token has nothing continuous to refine. The result is still a valid token of the same
size and format; it is decoded by the unchanged decoder.

The steps run as a `lax.scan`, so the program holds one step whatever their number. On XLA:CPU that needs the
decoder's convolutions in the form of `models.conv` (their input gradient with an HWIO kernel): with autodiff's
form, convolutions inside a loop body miss the YNNPACK library that those at the top level get. Measured on 2 CPU
cores, `GaussianTokenizer.encode` of 64 demo images with 25 steps: as a loop 11.4 s a call against 10.9 s
unrolled (36 s as a loop with autodiff's convolutions), and the first call, which compiles, 19.5 s against 43 s
unrolled. `unroll` is `lax.scan`'s, for a backend where unrolling pays.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from gaussiantoken_jax.checks import check_non_negative_int

# Adam's initial step in the geometry's own units: measured on the demo, 0.02 gains 1.7 / 2.3 / 2.7 dB held-out
# PSNR in 10 / 25 / 50 steps (docs/tokenizer.md).
LEARNING_RATE = 0.02


def fit_geometry(decode: Callable, means, rotations, scales, target, *, steps: int, learning_rate: float,
                 scale_bounds: tuple[float, float], unroll: int | bool = 1):
  """Refines (means, rotations, scales) so that `decode(means, rotations, scales)` approaches `target`.

  Args:
    decode: (means [B,K,2], rotations [B,K], scales [B,K,2]) -> images [B,H,W,3] in [-1, 1], differentiable;
      the codes are fixed inside it.
    means, rotations, scales: the encoded geometry to start from.
    target: the images being encoded, [B,H,W,3] in [-1, 1].
    steps: Adam steps (a Python int; 0 returns the geometry unchanged).
    learning_rate: Adam's initial step, in the geometry's own units (the [-1, 1] range of the centres, radians,
      feature pixels); it decays to 0 over `steps` (cosine), so the last steps settle instead of oscillating.
    scale_bounds: (smallest, largest) scale in feature pixels, the embedder's range: the centres stay in
      [-1, 1] and the scales in this range after every step.
    unroll: `lax.scan`'s unroll of the steps (module docstring).

  Each image's loss is the mean absolute error over its own pixels and the batch's losses are summed, so an
  image's fit does not depend on the batch it is encoded with.

  Adam's first steps move every coordinate by about the learning rate whatever its gradient. On a better-trained
  model that overshoots: on the demo trained for 2550 steps, plain Adam at 0.02 left every held-out crop worse
  after 5 steps and 31.12 dB against 31.43 as encoded after 25 (docs/tokenizer.md). So each image's step is
  checked: a step that raised the image's loss above its best so far is undone (the image goes back to its best
  point) and the image's later steps are halved. The result is, per image, the lowest-loss point among the start
  and every step's result, so a fit never leaves an image with a larger loss than it was encoded with. (On the
  2550-step demo 25 steps then gain 0.7 dB; on the 850-step demo, where Adam rarely overshoots, they give what
  plain Adam gives to 0.01 dB.)
  """
  check_non_negative_int("fit_geometry", "steps", steps)
  if not 0 < learning_rate < float("inf"):  # NaN fails too
    raise ValueError(f"fit_geometry: `learning_rate` must be positive and finite, got {learning_rate!r}.")
  if steps == 0:
    return means, rotations, scales
  low, high = scale_bounds
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def image_losses(geometry):  # [B]
    return jnp.mean(jnp.abs(decode(*geometry) - target), axis=(1, 2, 3))

  def loss(geometry):
    losses = image_losses(geometry)
    return jnp.sum(losses), losses

  def per_image(values, x):  # [B] -> broadcastable against x [B, ...]
    return values.reshape(values.shape + (1,) * (x.ndim - 1))

  def keep_lower(losses, geometry, best_losses, best):
    lower = losses < best_losses  # False for a NaN loss: that image keeps its best so far
    pick = lambda new, old: jnp.where(per_image(lower, new), new, old)
    return jnp.where(lower, losses, best_losses), jax.tree.map(pick, geometry, best)

  def update(carry, _):
    geometry, opt_state, best_losses, best, step_scale = carry
    (_, losses), grads = jax.value_and_grad(loss, has_aux=True)(geometry)
    rose = ~(losses <= best_losses)  # NaN counts as a rise
    step_scale = jnp.where(rose, step_scale * 0.5, step_scale)
    best_losses, best = keep_lower(losses, geometry, best_losses, best)
    updates, opt_state = tx.update(grads, opt_state)
    updates = jax.tree.map(lambda u: u * per_image(step_scale, u), updates)
    means, rotations, scales = optax.apply_updates(geometry, updates)
    stepped = (jnp.clip(means, -1.0, 1.0), rotations, jnp.clip(scales, low, high))
    geometry = jax.tree.map(lambda b, g: jnp.where(per_image(rose, g), b, g), best, stepped)
    return (geometry, opt_state, best_losses, best, step_scale), None

  geometry = (means, rotations, scales)
  no_loss_yet = jnp.full(means.shape[:1], jnp.inf, jnp.float32)
  carry = (geometry, tx.init(geometry), no_loss_yet, geometry, jnp.ones(means.shape[:1], jnp.float32))
  (geometry, _, best_losses, best, _), _ = jax.lax.scan(update, carry, None, length=steps, unroll=unroll)
  # The last step's result has not been scored yet: one more decode.
  _, best = keep_lower(image_losses(geometry), geometry, best_losses, best)
  return best


def fit_gaussians(model, variables, gaussians, images, *, steps: int, learning_rate: float = LEARNING_RATE):
  """`fit_geometry` for a GaussianToken model: its encoded `gaussians` (quantized features) refined against
  `images` ([B,H,W,3] in [-1, 1]) through `model.decode` with `variables` ({"params", **model_state}); the
  scales stay within the embedder's range (its `scale_min` and the trained `scale_max`)."""
  def decode(means, rotations, scales):
    fitted = gaussians.replace(means=means, rotations=rotations, scales=scales)
    return model.apply(variables, fitted, method="decode")

  scale_bounds = (model.embedder.scale_min, variables["range_scheduler"]["embedder"]["scale_max"])
  means, rotations, scales = fit_geometry(decode, gaussians.means, gaussians.rotations, gaussians.scales, images,
                                          steps=steps, learning_rate=learning_rate, scale_bounds=scale_bounds)
  return gaussians.replace(means=means, rotations=rotations, scales=scales)
