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
  """
  check_non_negative_int("fit_geometry", "steps", steps)
  if not 0 < learning_rate < float("inf"):  # NaN fails too
    raise ValueError(f"fit_geometry: `learning_rate` must be positive and finite, got {learning_rate!r}.")
  if steps == 0:
    return means, rotations, scales
  low, high = scale_bounds
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss(geometry):
    error = jnp.abs(decode(*geometry) - target)
    return jnp.sum(jnp.mean(error, axis=(1, 2, 3)))

  def update(carry, _):
    geometry, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(geometry), opt_state)
    means, rotations, scales = optax.apply_updates(geometry, updates)
    geometry = (jnp.clip(means, -1.0, 1.0), rotations, jnp.clip(scales, low, high))
    return (geometry, opt_state), None

  geometry = (means, rotations, scales)
  (geometry, _), _ = jax.lax.scan(update, (geometry, tx.init(geometry)), None, length=steps, unroll=unroll)
  return geometry


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
