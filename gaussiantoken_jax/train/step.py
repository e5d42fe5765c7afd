"""The train state, its sharded initialisation, and the jitted train and eval steps.

One training step, as the reference does it (reference-implementation.md sections 2.7-2.8), on one global batch:

  x      = to_model_input(images)                           uint8 -> [-1, 1]
  x_hat  = G(x)  (train mode: dropout, codebook EMA, k-means init on step 0, scale-range schedule)
  L_G    = l1_weight * L1 + lpips_weight * mean LPIPS (head dropout on, as in the reference)
           + w_gan * [step >= gan_start_step] * generator_gan_loss(D(x_hat)) + commitment_weight * commitment
  G     <- optax update with grad L_G; EMA of G's parameters
  D     <- optax update with grad of hinge(D(x), D(sg(x_hat))) + lecam_weight * LeCAM, on the same x_hat,
           the two LeCAM EMAs updated first; D's BatchNorm statistics threaded through D(x) then D(x_hat).

D inside L_G runs in train mode (batch statistics), and the statistics it would update are discarded: the
discriminator's own step is the only one that moves them. w_gan is `loss.gan_weight` or, with
`loss.adaptive_gan_weight`, VQGAN's adaptive weight times `loss.gan_weight` (taming's `disc_weight`).

Randomness: the state holds a raw PRNG key; step t uses fold_in(key, t), so a resumed run draws exactly what
an uninterrupted one draws. Every sum over the batch inside the model (codebook statistics) is a sum over the
global batch, because the step is one `jax.jit` over global arrays (XLA inserts the all-reduces).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaussiantoken_jax import losses, models
from gaussiantoken_jax.data import to_model_input
from gaussiantoken_jax.evaluation import image_metrics
from gaussiantoken_jax.train import optim, sharding

# The decoder's last convolution, whose gradients VQGAN's adaptive GAN weight compares.
LAST_LAYER_PATH = ("decoder", "conv_out", "kernel")

# Averaged over the logging interval (Average) or reported as the value of the last step (LastValue).
_AVERAGED = ("loss", "l1", "lpips", "gan", "gan_weight", "commitment", "disc_loss", "hinge", "lecam",
             "logits_real", "logits_fake", "lecam_ema_real", "lecam_ema_fake", "grad_norm", "disc_grad_norm",
             "codebook_usage", "perplexity")
_LAST = ("learning_rate", "disc_learning_rate")
_SCALE_MAX = "scale_max"


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; one pytree, saved and restored as a whole.

  Attributes:
    step: int32 scalar, the number of completed training steps.
    params / ema_params: the generator's trainable parameters and their EMA (used for evaluation).
    opt_state: the generator's optax state.
    model_state: the generator's non-trainable collections ("codebook", and "range_scheduler" for
      GaussianToken), updated by the forward pass.
    disc_params, disc_batch_stats, disc_opt_state: the discriminator.
    lecam_ema: float32 [2], the LeCAM EMAs of the mean real and fake logits.
    rng: raw uint32 [2] PRNG key; step t draws from fold_in(rng, t).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  model_state: Any
  disc_params: Any
  disc_batch_stats: Any
  disc_opt_state: Any
  lecam_ema: jax.Array
  rng: jax.Array


@functools.cache
def _metrics_class(with_scale_max: bool) -> type[clu_metrics.Collection]:
  fields = {name: clu_metrics.Average.from_output(name) for name in _AVERAGED}
  last = _LAST + ((_SCALE_MAX,) if with_scale_max else ())
  fields.update({name: clu_metrics.LastValue.from_output(name) for name in last})
  return clu_metrics.Collection.create(**fields)


def train_metrics_class(config: ml_collections.ConfigDict) -> type[clu_metrics.Collection]:
  """The clu Collection of the train step's metrics (GaussianToken adds the scale-range schedule's scale_max).

  One class per model type, so that the metrics of successive steps merge.
  """
  return _metrics_class(config.model.type == "gaussiantoken")


EvalMetrics = clu_metrics.Collection.create(psnr=clu_metrics.Average.from_output("psnr"),
                                            psnr_block_baseline=clu_metrics.Average.from_output("psnr_block_baseline"),
                                            lpips=clu_metrics.Average.from_output("lpips"))


def block_baseline_cells(config: ml_collections.ConfigDict) -> int:
  """Grid side of the trivial baseline with (at most) as many block means as the model has tokens per image."""
  num_tokens = (config.model.num_gaussians if config.model.type == "gaussiantoken"
                else math.prod(models.feature_shape(config)))
  return image_metrics.block_baseline_cells(num_tokens, config.data.image_size)


def _check_image_batch(function: str, batch, image_size: int, with_mask: bool) -> None:
  keys = ("image", "mask") if with_mask else ("image",)
  if not isinstance(batch, dict) or any(key not in batch for key in keys):
    raise ValueError(f"{function}: `batch` must be a dict with keys {keys}, got "
                     f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}.")
  image = batch["image"]
  if image.ndim != 4 or tuple(image.shape[1:]) != (image_size, image_size, 3) or image.dtype != jnp.uint8:
    raise ValueError(f"{function}: `batch['image']` must be uint8 [B, {image_size}, {image_size}, 3], got "
                     f"{image.dtype} of shape {tuple(image.shape)}.")
  if with_mask and (batch["mask"].shape != image.shape[:1] or batch["mask"].dtype != jnp.bool_):
    raise ValueError(f"{function}: `batch['mask']` must be bool [{image.shape[0]}], got {batch['mask'].dtype} "
                     f"of shape {tuple(batch['mask'].shape)}.")


def _find_leaf(tree, name: str):
  """The single leaf called `name` anywhere in `tree`, or None."""
  found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
           if getattr(path[-1], "key", None) == name]
  return found[0] if len(found) == 1 else None


def _with_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
  """A copy of the nested dict `tree` with tree[path[0]]...[path[-1]] replaced by `value`."""
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _with_leaf(tree[path[0]], path[1:], value)}


@dataclasses.dataclass(frozen=True)
class StepParts:
  """The modules and optimizers a step is built from (static: closed over by the jitted functions)."""
  config: ml_collections.ConfigDict
  model: Any
  discriminator: Any
  gen_tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  gen_schedule: optax.Schedule
  disc_schedule: optax.Schedule

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StepParts:
    return cls(config=config, model=models.build_model(config), discriminator=models.build_discriminator(config),
               gen_tx=optim.make_optimizer(config.optimizer, config.total_steps),
               disc_tx=optim.make_optimizer(config.disc_optimizer, config.total_steps),
               gen_schedule=optim.make_schedule(config.optimizer, config.total_steps),
               disc_schedule=optim.make_schedule(config.disc_optimizer, config.total_steps))


def init_train_state(parts: StepParts) -> TrainState:
  """A fresh TrainState from `config.seed` (pure; run it under `init_sharded` to place it on the mesh)."""
  config = parts.config
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params_key, dropout_key, quantizer_key, disc_key = jax.random.split(init_key, 4)
  variables = parts.model.init({"params": params_key, "dropout": dropout_key, "quantizer": quantizer_key},
                               images, train=False)
  params = variables["params"]
  disc_variables = parts.discriminator.init(disc_key, images, train=False)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      # A distinct copy, so that donating the state never hands XLA the same buffer twice.
      ema_params=jax.tree.map(lambda p: p + 0.0, params),
      opt_state=parts.gen_tx.init(params),
      model_state={name: value for name, value in variables.items() if name != "params"},
      disc_params=disc_variables["params"],
      disc_batch_stats=disc_variables["batch_stats"],
      disc_opt_state=parts.disc_tx.init(disc_variables["params"]),
      lecam_ema=jnp.zeros((2,), jnp.float32),
      rng=step_key,
  )


def _generator_terms(parts: StepParts, params, state: TrainState, x, lpips_params, keys):
  """One train-mode forward pass: (reconstruction loss, GAN loss, (L1, LPIPS, ModelOutput, new model state))."""
  loss_cfg = parts.config.loss
  dropout_key, quantizer_key, lpips_key = keys
  output, model_state = parts.model.apply(
      {"params": params, **state.model_state}, x, train=True, mutable=list(state.model_state),
      rngs={"dropout": dropout_key, "quantizer": quantizer_key})
  x_hat = output.reconstruction
  l1 = losses.l1_loss(x, x_hat)
  if loss_cfg.lpips_weight:
    perceptual = jnp.mean(losses.lpips_distance(lpips_params, x, x_hat, dtype=parts.config.model.conv_dtype,
                                                dropout_rng=lpips_key))
  else:  # VGG16 dominates a small model's step on CPU: skip it when it does not count (the CPU demo)
    perceptual = jnp.zeros((), jnp.float32)
  # Train-mode BatchNorm as in the reference's generator pass; its statistics update is dropped here.
  fake_logits, _ = parts.discriminator.apply(
      {"params": state.disc_params, "batch_stats": state.disc_batch_stats}, x_hat, train=True,
      mutable=["batch_stats"])
  gan = losses.generator_gan_loss(fake_logits)
  reconstruction = loss_cfg.l1_weight * l1 + loss_cfg.lpips_weight * perceptual
  return reconstruction, gan, (l1, perceptual, output, model_state)


def _adaptive_weight(parts: StepParts, state: TrainState, x, lpips_params, keys) -> jax.Array:
  """VQGAN's adaptive weight from the gradients w.r.t. the decoder's last kernel only (no full backward)."""
  params = state.params
  try:
    kernel = params[LAST_LAYER_PATH[0]][LAST_LAYER_PATH[1]][LAST_LAYER_PATH[2]]
  except KeyError as e:
    raise ValueError(f"loss.adaptive_gan_weight needs the generator parameter {'/'.join(LAST_LAYER_PATH)}, "
                     f"which this model lacks.") from e

  def term(last_kernel, index):
    return _generator_terms(parts, _with_leaf(params, LAST_LAYER_PATH, last_kernel), state, x, lpips_params,
                            keys)[index]

  rec_grads = jax.grad(term)(kernel, 0)
  gan_grads = jax.grad(term)(kernel, 1)
  return losses.adaptive_gan_weight(rec_grads, gan_grads)


def train_step(parts: StepParts, state: TrainState, batch: dict, lpips_params) -> tuple[TrainState, Any]:
  """One generator step and one discriminator step on `batch` {"image": uint8 [B, S, S, 3]} (global batch).

  Returns the new state and a `train_metrics_class(config)` Collection of this step's metrics. Pure: jit it
  (see `make_step_functions`).
  """
  config, loss_cfg = parts.config, parts.config.loss
  _check_image_batch("train_step", batch, config.data.image_size, with_mask=False)
  x = to_model_input(batch["image"])
  keys = tuple(jax.random.split(jax.random.fold_in(state.rng, state.step), 3))

  # --- Generator.
  gan_on = (state.step >= loss_cfg.gan_start_step).astype(jnp.float32)
  gan_weight = gan_on * loss_cfg.gan_weight
  if loss_cfg.adaptive_gan_weight:
    gan_weight = gan_weight * _adaptive_weight(parts, state, x, lpips_params, keys)

  def generator_loss(params):
    reconstruction, gan, aux = _generator_terms(parts, params, state, x, lpips_params, keys)
    output = aux[2]
    total = reconstruction + gan_weight * gan + loss_cfg.commitment_weight * output.commitment_loss
    return total, (gan, aux)

  (loss, (gan, (l1, perceptual, output, model_state))), grads = jax.value_and_grad(
      generator_loss, has_aux=True)(state.params)
  updates, opt_state = parts.gen_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optim.ema_update(state.ema_params, params, config.ema_decay)

  # --- Discriminator, on the same reconstructions.
  x_hat = jax.lax.stop_gradient(output.reconstruction)

  def discriminator_loss(disc_params):
    real_logits, disc_vars = parts.discriminator.apply(
        {"params": disc_params, "batch_stats": state.disc_batch_stats}, x, train=True, mutable=["batch_stats"])
    fake_logits, disc_vars = parts.discriminator.apply(
        {"params": disc_params, "batch_stats": disc_vars["batch_stats"]}, x_hat, train=True,
        mutable=["batch_stats"])
    ema_real = losses.update_lecam_ema(state.lecam_ema[0], real_logits, loss_cfg.lecam_decay)
    ema_fake = losses.update_lecam_ema(state.lecam_ema[1], fake_logits, loss_cfg.lecam_decay)
    hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
    lecam = losses.lecam_loss(real_logits, fake_logits, ema_real, ema_fake)
    aux = dict(batch_stats=disc_vars["batch_stats"], lecam_ema=jnp.stack([ema_real, ema_fake]), hinge=hinge,
               lecam=lecam, logits_real=jnp.mean(real_logits), logits_fake=jnp.mean(fake_logits))
    return hinge + loss_cfg.lecam_weight * lecam, aux

  (disc_loss, disc_aux), disc_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(state.disc_params)
  disc_updates, disc_opt_state = parts.disc_tx.update(disc_grads, state.disc_opt_state, state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, disc_updates)

  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state, model_state=model_state,
      disc_params=disc_params, disc_batch_stats=disc_aux["batch_stats"], disc_opt_state=disc_opt_state,
      lecam_ema=disc_aux["lecam_ema"])

  outputs = dict(
      loss=loss, l1=l1, lpips=perceptual, gan=gan, gan_weight=gan_weight, commitment=output.commitment_loss,
      disc_loss=disc_loss, hinge=disc_aux["hinge"], lecam=disc_aux["lecam"],
      logits_real=disc_aux["logits_real"], logits_fake=disc_aux["logits_fake"],
      lecam_ema_real=disc_aux["lecam_ema"][0], lecam_ema_fake=disc_aux["lecam_ema"][1],
      grad_norm=optax.tree.norm(grads), disc_grad_norm=optax.tree.norm(disc_grads),
      codebook_usage=output.usage, perplexity=output.perplexity,
      learning_rate=parts.gen_schedule(state.step), disc_learning_rate=parts.disc_schedule(state.step))
  if config.model.type == "gaussiantoken":
    outputs[_SCALE_MAX] = _find_leaf(model_state, _SCALE_MAX)
  return new_state, train_metrics_class(config).single_from_model_output(**outputs)


def eval_step(parts: StepParts, ema_params, model_state, batch: dict, lpips_params):
  """Reconstructs a masked eval batch {"image", "mask"} with the EMA parameters (train=False).

  Returns (EvalMetrics with per-image PSNR on [0, 1] after clipping, the PSNR of the block-average baseline
  with as many cells as the model has tokens (`block_baseline_cells`) and LPIPS, masked; int32
  [codebook_size] code counts over the unmasked images; float32 reconstructions in [-1, 1], clipped).
  """
  config = parts.config
  _check_image_batch("eval_step", batch, config.data.image_size, with_mask=True)
  x = to_model_input(batch["image"])
  mask = batch["mask"]
  output = parts.model.apply({"params": ema_params, **model_state}, x, train=False)
  x_hat = jnp.clip(output.reconstruction, -1.0, 1.0)
  originals = (x + 1.0) * 0.5
  psnr = image_metrics.psnr(originals, (x_hat + 1.0) * 0.5)
  baseline = image_metrics.psnr(originals, image_metrics.block_average(originals, block_baseline_cells(config)))
  perceptual = losses.lpips_distance(lpips_params, x, x_hat)
  indices = output.indices.reshape(output.indices.shape[0], -1)
  weights = jnp.broadcast_to(mask[:, None], indices.shape).astype(jnp.int32)
  counts = jnp.zeros((config.model.codebook_size,), jnp.int32).at[indices.reshape(-1)].add(weights.reshape(-1))
  return EvalMetrics.single_from_model_output(psnr=psnr, psnr_block_baseline=baseline, lpips=perceptual,
                                              mask=mask), counts, x_hat


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The jitted, sharded functions of a run, built once by `make_step_functions`.

  Attributes:
    parts: the modules and optimizers.
    mesh: the device mesh.
    abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings (for restoring).
    batch_sharding: how global batches are laid out (pass it to `data.to_global_array`).
    init: () -> TrainState, created directly in its shardings.
    train_step: (state, batch, lpips_params) -> (state, metrics); the state is donated.
    eval_step: (ema_params, model_state, batch, lpips_params) -> (EvalMetrics, code counts, reconstructions).
    replicate: puts a host pytree (e.g. the LPIPS parameters) on every device of the mesh.
  """
  parts: StepParts
  mesh: Mesh
  abstract_state: TrainState
  batch_sharding: NamedSharding
  init: Callable[[], TrainState]
  train_step: Callable[..., tuple[TrainState, Any]]
  eval_step: Callable[..., tuple[Any, jax.Array, jax.Array]]
  replicate: Callable[[Any], Any]

  def _images(self, batch_size: int) -> jax.ShapeDtypeStruct:
    size = self.parts.config.data.image_size
    return jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=self.batch_sharding)

  def compile_train_step(self, state: TrainState, lpips_params, batch_size: int):
    """`train_step` compiled ahead of time for global batches of `batch_size` (call it like `train_step`)."""
    return self.train_step.lower(state, {"image": self._images(batch_size)}, lpips_params).compile()

  def compile_eval_step(self, state: TrainState, lpips_params, batch_size: int):
    """`eval_step` compiled ahead of time for global eval batches of `batch_size`."""
    mask = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=self.batch_sharding)
    return self.eval_step.lower(state.ema_params, state.model_state, {"image": self._images(batch_size),
                                                                      "mask": mask}, lpips_params).compile()


def make_step_functions(config: ml_collections.ConfigDict, mesh: Mesh) -> StepFunctions:
  """Builds the model, optimizers, state shardings and the jitted init / train / eval steps for `mesh`."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh (see train.sharding.make_mesh), got {type(mesh).__name__}.")
  parts = StepParts.from_config(config)
  min_weight_size = config.mesh.fsdp_min_weight_size
  init_fn = lambda: init_train_state(parts)  # noqa: E731
  abstract = jax.eval_shape(init_fn)
  state_shardings = sharding.param_shardings(mesh, abstract, min_weight_size)
  abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                abstract, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  def replicate(tree):
    # make_array_from_callback works with several processes too: each fills its own devices from its copy.
    return jax.tree.map(lambda x: jax.make_array_from_callback(jnp.shape(x), replicated,
                                                               lambda index: np.asarray(x)[index]), tree)

  train = jax.jit(lambda state, batch, lpips_params: train_step(parts, state, batch, lpips_params),
                  in_shardings=(state_shardings, batch_sharding, replicated),
                  out_shardings=(state_shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(
      lambda ema_params, model_state, batch, lpips_params: eval_step(parts, ema_params, model_state, batch,
                                                                     lpips_params),
      in_shardings=(state_shardings.ema_params, state_shardings.model_state, batch_sharding, replicated),
      out_shardings=(replicated, replicated, batch_sharding))
  return StepFunctions(
      parts=parts, mesh=mesh, abstract_state=abstract_state, batch_sharding=batch_sharding,
      init=lambda: sharding.init_sharded(init_fn, mesh, min_weight_size=min_weight_size),
      train_step=train, eval_step=evaluate, replicate=replicate)


def code_usage_and_perplexity(counts) -> tuple[float, float]:
  """(fraction of codes used at least once, exp of the entropy of the code distribution) from code counts."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return 0.0, math.nan
  probabilities = counts[counts > 0] / total
  return float(np.mean(counts > 0)), float(np.exp(-np.sum(probabilities * np.log(probabilities))))
