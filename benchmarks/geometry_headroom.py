r"""How much a trained GaussianToken could gain from per-image geometry: optimise it with the decoder frozen.

Restores a run's EMA generator, encodes held-out demo crops, then, per row of the table, optimises one part of the
tokens of every image by itself (Adam on the L1 reconstruction loss, everything else frozen: the encoder, the
codebook, the decoder) and reports the held-out PSNR before and after and how far the part moved. The geometry
rows say how much the continuous geometry COULD carry with this decoder if the embedder predicted it per image;
the "features" row (continuous, unquantized) is what the quantizer costs, for scale.

    python benchmarks/geometry_headroom.py --workdir=/tmp/gt_demo [--num_images=64] [--steps=200] [--lr=0.02]

Scales are clipped to [0.1, 3] feature pixels and centres to [-1, 1] (the embedder's output ranges) while
optimising. Only GaussianToken runs of `configs/demo.py` (its held-out crops) are supported.
"""
from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gaussiantoken_jax import pixels, restore
from gaussiantoken_jax.data import demo as demo_data
from gaussiantoken_jax.evaluation import image_metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a GaussianToken demo run.", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Held-out demo crops to use.")
_STEPS = flags.DEFINE_integer("steps", 200, "Adam steps per row.")
_LR = flags.DEFINE_float("lr", 0.02, "Adam learning rate (in the units of each part: pixels, radians, [-1, 1]).")

ROWS = (("means",), ("rotations", "scales"), ("means", "rotations", "scales"), ("features",))


def main(argv):
  del argv
  restored = restore.restore_model(_WORKDIR.value)
  if restored.config.model.type != "gaussiantoken":
    raise ValueError(f"--workdir must hold a GaussianToken run, got model.type={restored.config.model.type!r}.")
  source = demo_data.DemoEvalSource(restored.config.data.image_size)
  images = np.stack([source[i]["data"] for i in range(min(_NUM_IMAGES.value, len(source)))])
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  model, variables = restored.model, {"params": restored.params, **restored.model_state}
  encoded, _ = model.apply(variables, x, train=False, method=lambda m, x, train: m.encode(x, train=train))

  def reconstruct(gaussians):
    gaussians = gaussians.replace(scales=jnp.clip(gaussians.scales, 0.1, 3.0),
                                  means=jnp.clip(gaussians.means, -1.0, 1.0))
    return model.apply(variables, gaussians, method=lambda m, g: m.decode(g))

  def held_out_psnr(gaussians) -> float:
    reconstructed = pixels.to_pixels(reconstruct(gaussians)) / 255.0
    return float(jnp.mean(image_metrics.psnr(reconstructed, jnp.asarray(images, jnp.float32) / 255.0)))

  print(f"{restored.config.model.type} step {restored.step}, {len(images)} held-out crops, "
        f"{_STEPS.value} Adam steps at lr {_LR.value} per row")
  print(f"{'optimised per image':28s} {'PSNR':>7s}   moved (std of the change)")
  print(f"{'nothing (as encoded)':28s} {held_out_psnr(encoded):7.2f}")
  tx = optax.adam(_LR.value)
  for fields in ROWS:
    def loss(part):
      return jnp.mean(jnp.abs(reconstruct(encoded.replace(**part)) - x))

    @jax.jit
    def update(part, opt_state):
      grads = jax.grad(loss)(part)
      updates, opt_state = tx.update(grads, opt_state)
      return optax.apply_updates(part, updates), opt_state

    part = {name: getattr(encoded, name) for name in fields}
    opt_state = tx.init(part)
    for _ in range(_STEPS.value):
      part, opt_state = update(part, opt_state)
    moved = ", ".join(f"{name} {float(jnp.std(part[name] - getattr(encoded, name))):.3f}" for name in fields)
    print(f"{' + '.join(fields):28s} {held_out_psnr(encoded.replace(**part)):7.2f}   {moved}", flush=True)


if __name__ == "__main__":
  app.run(main)
