r"""How much a trained GaussianToken could gain from per-image geometry, and whether the image predicts it.

Restores a run's EMA generator, encodes held-out demo crops, then, per row of the first table, optimises one part
of the tokens of every image by itself (Adam on the L1 reconstruction loss, everything else frozen: the encoder,
the codebook, the decoder) and reports the held-out PSNR before and after and how far the part moved. The geometry
rows say how much the continuous geometry COULD carry with this decoder if the embedder predicted it per image;
the "features" row (continuous, unquantized) is what the quantizer costs, for scale.

With `--predict_train_images=N`, a second table asks whether that per-image geometry is a function of what the
encoder sees around each Gaussian: the optimised change of all geometry (centre, rotation, scales; 5 numbers per
Gaussian) is regressed (ridge, standardised inputs) on the encoder's feature map sampled at 3x3 points one
feature pixel apart around the Gaussian's centre, fitted on N random training crops and scored on the held-out
crops: R^2 per component, and the held-out PSNR with the predicted change applied.

Before both, one line per geometry part says how much the encoded geometry varies ACROSS images (the std over the
images of each Gaussian's value, averaged over the Gaussians and components) against WITHIN one image (the std over
the Gaussians, averaged over the images), as encoded and after the per-image optimisation of all geometry: a
feed-forward embedder that puts the Gaussians in the same place for every image shows ~0 across.

    python benchmarks/geometry_headroom.py --workdir=/tmp/gt_demo [--step=N] [--num_images=64] [--steps=200]
    python benchmarks/geometry_headroom.py --workdir=/tmp/gt_demo --predict_train_images=192 --steps=150

Scales are clipped to [0.1, 3] feature pixels and centres to [-1, 1] (the embedder's output ranges) while
optimising. Only GaussianToken runs of `configs/demo.py` (its crops) are supported.
"""
from __future__ import annotations

import functools

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gaussiantoken_jax import pixels, restore
from gaussiantoken_jax.data import demo as demo_data
from gaussiantoken_jax.data import transforms
from gaussiantoken_jax.evaluation import image_metrics
from gaussiantoken_jax.models.deformable_attention import bilinear_sample

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a GaussianToken demo run.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Held-out demo crops to use.")
_STEPS = flags.DEFINE_integer("steps", 200, "Adam steps per row.")
_LR = flags.DEFINE_float("lr", 0.02, "Adam learning rate (in the units of each part: pixels, radians, [-1, 1]).")
_PREDICT_TRAIN_IMAGES = flags.DEFINE_integer(
    "predict_train_images", 0, "Random training crops to fit the geometry predictor on; 0 skips that table.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images optimised at once.")

ROWS = (("means",), ("rotations", "scales"), ("means", "rotations", "scales"), ("features",))
GEOMETRY = ("means", "rotations", "scales")
RIDGE = (1.0, 10.0, 100.0, 1000.0)
# The 3x3 sampling points around a centre, in feature pixels (x, y).
NEIGHBOURHOOD = np.array([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], np.float32)


def geometry_change(before, after) -> np.ndarray:
  """[B, K, 5]: the change of centre (2), rotation (1) and scales (2)."""
  return np.concatenate([np.asarray(after.means - before.means),
                         np.asarray(after.rotations - before.rotations)[..., None],
                         np.asarray(after.scales - before.scales)], axis=-1)


def spread(values: np.ndarray) -> tuple[float, float]:
  """(across images, within an image) of [B, K, ...] values: the std over one axis, averaged over the others."""
  return float(np.mean(np.std(values, axis=0))), float(np.mean(np.std(values, axis=1)))


def apply_change(gaussians, change):
  return gaussians.replace(means=gaussians.means + change[..., :2], rotations=gaussians.rotations + change[..., 2],
                           scales=gaussians.scales + change[..., 3:5])


def main(argv):
  del argv
  restored = restore.restore_model(_WORKDIR.value, _STEP.value)
  if restored.config.model.type != "gaussiantoken":
    raise ValueError(f"--workdir must hold a GaussianToken run, got model.type={restored.config.model.type!r}.")
  size = restored.config.data.image_size
  source = demo_data.DemoEvalSource(size)
  images = np.stack([source[i]["data"] for i in range(min(_NUM_IMAGES.value, len(source)))])
  model, variables = restored.model, {"params": restored.params, **restored.model_state}

  @jax.jit
  def encode(images):
    """uint8 images -> (the encoder's feature map, Gaussians with quantized features, model input)."""
    x = pixels.to_model_input(images)
    return model.apply(variables, x, method=lambda m, x: (m.encoder(x), m.encode(x, train=False)[0], x))

  def reconstruct(gaussians):
    gaussians = gaussians.replace(scales=jnp.clip(gaussians.scales, 0.1, 3.0),
                                  means=jnp.clip(gaussians.means, -1.0, 1.0))
    return model.apply(variables, gaussians, method=lambda m, g: m.decode(g))

  def held_out_psnr(gaussians) -> float:
    reconstructed = pixels.to_pixels(reconstruct(gaussians)) / 255.0
    return float(jnp.mean(image_metrics.psnr(reconstructed, jnp.asarray(images, jnp.float32) / 255.0)))

  tx = optax.adam(_LR.value)

  @functools.partial(jax.jit, static_argnames="fields")
  def optimise(gaussians, x, fields):
    """Every image's `fields` of `gaussians`, optimised by itself against its target x (L1)."""
    def loss(part):
      return jnp.mean(jnp.abs(reconstruct(gaussians.replace(**part)) - x))

    def update(carry, _):
      part, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(part), opt_state)
      return (optax.apply_updates(part, updates), opt_state), None

    part = {name: getattr(gaussians, name) for name in fields}
    (part, _), _ = jax.lax.scan(update, (part, tx.init(part)), None, length=_STEPS.value)
    return gaussians.replace(**part)

  _, encoded, x = encode(images)
  print(f"{restored.config.model.type} step {restored.step}, {len(images)} held-out crops, "
        f"{_STEPS.value} Adam steps at lr {_LR.value} per row")
  print(f"{'optimised per image':28s} {'PSNR':>7s}   moved (std of the change)")
  print(f"{'nothing (as encoded)':28s} {held_out_psnr(encoded):7.2f}")
  geometry_fitted = None
  for fields in ROWS:
    optimised = optimise(encoded, x, fields)
    if fields == GEOMETRY:
      geometry_fitted = optimised
    moved = ", ".join(f"{name} {float(jnp.std(getattr(optimised, name) - getattr(encoded, name))):.3f}"
                      for name in fields)
    print(f"{' + '.join(fields):28s} {held_out_psnr(optimised):7.2f}   {moved}", flush=True)

  print(f"\n{'spread: across images / within an image':42s} {'as encoded':>17s} {'geometry optimised':>19s}")
  units = {"means": "[-1, 1] range", "rotations": "rad", "scales": "feature px"}
  for name in GEOMETRY:
    columns = [spread(np.asarray(getattr(g, name))) for g in (encoded, geometry_fitted)]
    print(f"{name + ' (' + units[name] + ')':42s} " + " ".join(f"{a:8.4f} / {w:6.3f}" for a, w in columns))

  if _PREDICT_TRAIN_IMAGES.value:
    predictability_table(images, encode, optimise, held_out_psnr)


def local_features(feature_map, means) -> np.ndarray:
  """[B, K, 9 * C]: the feature map sampled bilinearly at the 3x3 points around each centre."""
  batch, height, width, channels = feature_map.shape
  centres = (means + 1.0) / 2.0  # bilinear_sample's [0, 1] convention, the splat's pixel geometry
  points = centres[:, :, None, :] + jnp.asarray(NEIGHBOURHOOD) / jnp.array([width, height], jnp.float32)
  samples = bilinear_sample(feature_map.reshape(batch, height, width, 1, channels), points[:, :, None])
  return np.asarray(samples).reshape(batch, means.shape[1], -1)


def predictability_table(held_out_images, encode, optimise, held_out_psnr) -> None:
  rng = np.random.default_rng(0)
  train_source = demo_data.DemoTrainSource()
  size = held_out_images.shape[1]
  train_images = np.stack([transforms.random_scale_crop(train_source[i % len(train_source)]["data"], rng, size)
                           for i in range(_PREDICT_TRAIN_IMAGES.value)])

  def features_and_targets(images):
    features, targets, encoded_all = [], [], []
    for start in range(0, len(images), _BATCH.value):
      feature_map, encoded, x = encode(images[start:start + _BATCH.value])
      features.append(local_features(feature_map, encoded.means))
      targets.append(geometry_change(encoded, optimise(encoded, x, GEOMETRY)))
      encoded_all.append(encoded)
    return np.concatenate(features), np.concatenate(targets), jax.tree.map(lambda *a: jnp.concatenate(a),
                                                                           *encoded_all)

  train_features, train_targets, _ = features_and_targets(train_images)
  held_features, held_targets, held_encoded = features_and_targets(held_out_images)
  mean = train_features.reshape(-1, train_features.shape[-1]).mean(0)
  std = train_features.reshape(-1, train_features.shape[-1]).std(0) + 1e-6

  def design(features):
    standardised = ((features - mean) / std).reshape(-1, features.shape[-1])
    return np.concatenate([standardised, np.ones((len(standardised), 1))], axis=-1).astype(np.float64)

  def r2(target, prediction):
    return 1.0 - ((target - prediction) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)

  x_train, x_held = design(train_features), design(held_features)
  y_train, y_held = train_targets.reshape(-1, 5), held_targets.reshape(-1, 5)
  print(f"\nIs the optimised geometry a linear function of the encoder's features around each Gaussian? Ridge on "
        f"{x_train.shape[1] - 1} inputs, fitted on {len(train_images)} training crops x {train_targets.shape[1]} "
        f"Gaussians, scored on the held-out crops (R^2 per component: dx, dy, rotation, scale x, scale y)")
  print(f"std of the optimised change on the held-out crops: {np.round(y_held.std(0).astype(np.float64), 3).tolist()}")
  print(f"{'ridge':>7s}  {'R^2 held out':40s}  {'R^2 training':40s}  held-out PSNR, predicted change applied")
  for ridge in RIDGE:
    weights = np.linalg.solve(x_train.T @ x_train + ridge * np.eye(x_train.shape[1]), x_train.T @ y_train)
    prediction = (x_held @ weights).reshape(held_targets.shape).astype(np.float32)
    print(f"{ridge:7.0f}  {str(np.round(r2(y_held, x_held @ weights), 3).tolist()):40s}  "
          f"{str(np.round(r2(y_train, x_train @ weights), 3).tolist()):40s}  "
          f"{held_out_psnr(apply_change(held_encoded, prediction)):.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
