"""The train state and the train and eval steps, built once per run by `make_steps(config, mesh)` (`Steps`).

One training step, as the reference does it (docs/training.md, "One step"), on one global batch:

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
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaussiantoken_jax import geometry_fit, losses, models, xla_options
from gaussiantoken_jax.evaluation import image_metrics
from gaussiantoken_jax.pixels import to_model_input
from gaussiantoken_jax.train import optim, sharding

# The decoder's last convolution, whose gradients VQGAN's adaptive GAN weight compares.
LAST_LAYER_PATH = ("decoder", "conv_out", "kernel")

# Train metrics reported as the value of the interval's last step; the others are averaged over it.
LAST_VALUE_METRICS = ("learning_rate", "disc_learning_rate", "scale_max")
# Where GaussianToken's model state keeps the scale-range schedule's current maximum scale.
SCALE_MAX_PATH = ("range_scheduler", "embedder", "scale_max")


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
    lecam_ema_real / lecam_ema_fake: float32 scalars, the LeCAM EMAs of the mean real and fake logits.
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
  lecam_ema_real: jax.Array
  lecam_ema_fake: jax.Array
  rng: jax.Array


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


def _with_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
  """A copy of the nested dict `tree` with tree[path[0]]...[path[-1]] replaced by `value`."""
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _with_leaf(tree[path[0]], path[1:], value)}


def _get_leaf(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


@dataclasses.dataclass(frozen=True, eq=False)
class Steps:
  """A run's model, optimizers and mesh, and its init / train / eval steps; built once by `make_steps`.

  The state shardings are computed once (`abstract_state`); the steps are jitted once, on first use.

  Attributes:
    config: the run's config.
    mesh: the ("data", "fsdp") device mesh (`sharding.make_mesh`).
    model, discriminator: the Flax modules (unbound).
    gen_tx, disc_tx: the optax optimizers of G and D; gen_schedule, disc_schedule: their learning rates.
  """
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: Any
  discriminator: Any
  gen_tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  gen_schedule: optax.Schedule
  disc_schedule: optax.Schedule

  @functools.cached_property
  def _init_fn(self):
    # One function object for both `abstract_state` and `_compiled_init`: JAX caches traces by the function's
    # identity, so the second use reuses the first trace (demo: about 1 s saved per Steps).
    return sharding.traced_on(self.mesh, functools.partial(init_train_state, self))

  @functools.cached_property
  def abstract_state(self) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their shardings (`sharding.param_shardings`); for restoring."""
    abstract = jax.eval_shape(self._init_fn)
    shardings = sharding.param_shardings(self.mesh, abstract, self.config.mesh.fsdp_min_weight_size)
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract,
                        shardings)

  @property
  def state_shardings(self) -> TrainState:
    return jax.tree.map(lambda leaf: leaf.sharding, self.abstract_state)

  @property
  def batch_sharding(self) -> NamedSharding:
    """How global batches are laid out (pass it to `data.to_global_array`)."""
    return sharding.batch_sharding(self.mesh)

  @property
  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def init(self) -> TrainState:
    """A fresh TrainState from `config.seed`, created directly in its shardings.

    The init runs under `jax.jit(..., out_shardings=state_shardings)`, so each device only ever holds its own
    shards: there is never a full host or single-device copy of a large state.
    """
    return self._compiled_init()

  @functools.cached_property
  def _compiled_init(self):
    init = jax.jit(self._init_fn, out_shardings=self.state_shardings,
                   compiler_options=xla_options.compiler_options(self.mesh)).lower()
    # The program is one threefry draw per parameter, run once. On XLA:CPU, LLVM's -O1 compiles it in about 60%
    # of the time of the default -O2 (demo: 9 against 16 s) and gave the same bits on every config checked
    # (tests/test_train_step.py holds it to that); the train step is not compiled this way: slower, other bits.
    options = {"xla_backend_optimization_level": 1} if self.mesh.devices.flat[0].platform == "cpu" else None
    return init.compile(compiler_options=options)

  @property
  def compiler_options(self) -> dict | None:
    """The compile options of the programs that run the model on the mesh (`xla_options.compiler_options`)."""
    return xla_options.compiler_options(self.mesh, self.config.model.conv_dtype)

  def replicate(self, tree):
    """Puts a host pytree (e.g. the LPIPS parameters) on every device of the mesh."""
    # make_array_from_callback works with several processes too: each fills its own devices from its copy.
    return jax.tree.map(lambda x: jax.make_array_from_callback(jnp.shape(x), self._replicated,
                                                               lambda index: np.asarray(x)[index]), tree)

  def abstract_batch(self, batch_size: int, with_mask: bool = False) -> dict:
    """A global batch of `batch_size` as ShapeDtypeStructs, for compiling ahead of time:
    `steps.train_step.lower(state, steps.abstract_batch(n), lpips_params).compile()`."""
    size = self.config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=self.batch_sharding)}
    if with_mask:
      batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=self.batch_sharding)
    return batch

  @functools.cached_property
  def train_step(self):
    """The module's `train_step`, jitted: (state, batch, lpips_params) -> (state, metrics); the state is donated."""
    return jax.jit(sharding.traced_on(self.mesh, functools.partial(train_step, self)),
                   in_shardings=(self.state_shardings, self.batch_sharding, self._replicated),
                   out_shardings=(self.state_shardings, self._replicated), donate_argnums=0,
                   compiler_options=self.compiler_options)

  @functools.cached_property
  def eval_step(self):
    """The module's `eval_step`, jitted: (ema_params, model_state, batch, lpips_params) -> EvalOutput."""
    shardings = self.state_shardings
    return jax.jit(sharding.traced_on(self.mesh, functools.partial(eval_step, self)),
                   in_shardings=(shardings.ema_params, shardings.model_state, self.batch_sharding, self._replicated),
                   out_shardings=EvalOutput(metrics=self._replicated, code_counts=self._replicated,
                                            reconstructions=self.batch_sharding, indices=self.batch_sharding,
                                            gaussians=self.batch_sharding),
                   compiler_options=self.compiler_options)


def make_steps(config: ml_collections.ConfigDict, mesh: Mesh) -> Steps:
  """The model, optimizers and (jitted on first use) init / train / eval steps of `config` on `mesh`."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh (see train.sharding.make_mesh), got {type(mesh).__name__}.")
  return Steps(config=config, mesh=mesh, model=models.build_model(config),
               discriminator=models.build_discriminator(config),
               gen_tx=optim.make_optimizer(config.optimizer, config.total_steps),
               disc_tx=optim.make_optimizer(config.disc_optimizer, config.total_steps),
               gen_schedule=optim.make_schedule(config.optimizer, config.total_steps),
               disc_schedule=optim.make_schedule(config.disc_optimizer, config.total_steps))


def init_train_state(steps: Steps) -> TrainState:
  """A fresh TrainState from `config.seed` (pure, unsharded; `Steps.init` runs it in the state's shardings)."""
  config = steps.config
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params_key, dropout_key, quantizer_key, disc_key = jax.random.split(init_key, 4)
  variables = steps.model.init({"params": params_key, "dropout": dropout_key, "quantizer": quantizer_key},
                               images, train=False)
  params = variables["params"]
  disc_variables = steps.discriminator.init(disc_key, images, train=False)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      # A distinct copy, so that donating the state never hands XLA the same buffer twice.
      ema_params=jax.tree.map(lambda p: p + 0.0, params),
      opt_state=steps.gen_tx.init(params),
      model_state={name: value for name, value in variables.items() if name != "params"},
      disc_params=disc_variables["params"],
      disc_batch_stats=disc_variables["batch_stats"],
      disc_opt_state=steps.disc_tx.init(disc_variables["params"]),
      lecam_ema_real=jnp.zeros((), jnp.float32),
      lecam_ema_fake=jnp.zeros((), jnp.float32),
      rng=step_key,
  )


@flax.struct.dataclass
class GeneratorTerms:
  """One train-mode forward pass of G and its loss terms (before their weights, except `reconstruction`).

  Attributes:
    reconstruction: l1_weight * l1 + lpips_weight * lpips.
    gan: the generator's GAN loss on D(x_hat).
    l1, lpips: the reconstruction terms (lpips 0 when its weight is 0: not computed).
    output: the model's ModelOutput (reconstruction, commitment loss, code usage, ...).
    model_state: the generator's updated non-trainable collections.
  """
  reconstruction: jax.Array
  gan: jax.Array
  l1: jax.Array
  lpips: jax.Array
  output: Any
  model_state: Any


def _generator_terms(steps: Steps, params, state: TrainState, x, lpips_params, keys) -> GeneratorTerms:
  """One train-mode forward pass of G with `params`, and D's logits of its reconstructions."""
  loss_cfg = steps.config.loss
  dropout_key, quantizer_key, lpips_key = keys
  output, model_state = steps.model.apply(
      {"params": params, **state.model_state}, x, train=True, mutable=list(state.model_state),
      rngs={"dropout": dropout_key, "quantizer": quantizer_key})
  x_hat = output.reconstruction
  l1 = losses.l1_loss(x, x_hat)
  if loss_cfg.lpips_weight:
    perceptual = jnp.mean(losses.lpips_distance(lpips_params, x, x_hat, dtype=steps.config.model.conv_dtype,
                                                dropout_rng=lpips_key))
  else:  # VGG16 dominates a small model's step on CPU: skip it when it does not count (the CPU demo)
    perceptual = jnp.zeros((), jnp.float32)
  # Train-mode BatchNorm as in the reference's generator pass; its statistics update is dropped here.
  fake_logits, _ = steps.discriminator.apply(
      {"params": state.disc_params, "batch_stats": state.disc_batch_stats}, x_hat, train=True,
      mutable=["batch_stats"])
  return GeneratorTerms(reconstruction=loss_cfg.l1_weight * l1 + loss_cfg.lpips_weight * perceptual,
                        gan=losses.generator_gan_loss(fake_logits), l1=l1, lpips=perceptual, output=output,
                        model_state=model_state)


def _adaptive_weight(steps: Steps, state: TrainState, x, lpips_params, keys) -> jax.Array:
  """VQGAN's adaptive weight from the gradients w.r.t. the decoder's last kernel only (no full backward)."""
  params = state.params
  try:
    kernel = _get_leaf(params, LAST_LAYER_PATH)
  except KeyError as e:
    raise ValueError(f"loss.adaptive_gan_weight needs the generator parameter {'/'.join(LAST_LAYER_PATH)}, "
                     f"which this model lacks.") from e

  def losses_of(last_kernel):
    terms = _generator_terms(steps, _with_leaf(params, LAST_LAYER_PATH, last_kernel), state, x, lpips_params, keys)
    return terms.reconstruction, terms.gan

  # One forward pass, pulled back twice (two jax.grad calls would trace and run it twice).
  (reconstruction, gan), pullback = jax.vjp(losses_of, kernel)
  (rec_grads,), (gan_grads,) = (pullback((jnp.ones_like(reconstruction), jnp.zeros_like(gan))),
                                pullback((jnp.zeros_like(reconstruction), jnp.ones_like(gan))))
  return losses.adaptive_gan_weight(rec_grads, gan_grads)


def train_step(steps: Steps, state: TrainState, batch: dict, lpips_params) -> tuple[TrainState, dict[str, jax.Array]]:
  """One generator step and one discriminator step on `batch` {"image": uint8 [B, S, S, 3]} (global batch).

  Returns the new state and a dict of this step's scalar metrics (GaussianToken adds `scale_max`, the
  scale-range schedule's value after the step). Pure: `Steps.train_step` is its jitted form.
  """
  config, loss_cfg = steps.config, steps.config.loss
  _check_image_batch("train_step", batch, config.data.image_size, with_mask=False)
  x = to_model_input(batch["image"])
  keys = tuple(jax.random.split(jax.random.fold_in(state.rng, state.step), 3))

  # --- Generator.
  gan_on = (state.step >= loss_cfg.gan_start_step).astype(jnp.float32)
  gan_weight = gan_on * loss_cfg.gan_weight
  if loss_cfg.adaptive_gan_weight:
    gan_weight = gan_weight * _adaptive_weight(steps, state, x, lpips_params, keys)

  def generator_loss(params):
    terms = _generator_terms(steps, params, state, x, lpips_params, keys)
    total = terms.reconstruction + gan_weight * terms.gan + loss_cfg.commitment_weight * terms.output.commitment_loss
    return total, terms

  (loss, terms), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params)
  updates, opt_state = steps.gen_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optim.ema_update(state.ema_params, params, config.ema_decay)

  # --- Discriminator, on the same reconstructions.
  x_hat = jax.lax.stop_gradient(terms.output.reconstruction)

  def discriminator_loss(disc_params):
    real_logits, disc_vars = steps.discriminator.apply(
        {"params": disc_params, "batch_stats": state.disc_batch_stats}, x, train=True, mutable=["batch_stats"])
    fake_logits, disc_vars = steps.discriminator.apply(
        {"params": disc_params, "batch_stats": disc_vars["batch_stats"]}, x_hat, train=True,
        mutable=["batch_stats"])
    ema_real = losses.update_lecam_ema(state.lecam_ema_real, real_logits, loss_cfg.lecam_decay)
    ema_fake = losses.update_lecam_ema(state.lecam_ema_fake, fake_logits, loss_cfg.lecam_decay)
    hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
    lecam = losses.lecam_loss(real_logits, fake_logits, ema_real, ema_fake)
    aux = dict(batch_stats=disc_vars["batch_stats"], lecam_ema_real=ema_real, lecam_ema_fake=ema_fake,
               hinge=hinge, lecam=lecam, logits_real=jnp.mean(real_logits), logits_fake=jnp.mean(fake_logits))
    return hinge + loss_cfg.lecam_weight * lecam, aux

  (disc_loss, disc_aux), disc_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(state.disc_params)
  disc_updates, disc_opt_state = steps.disc_tx.update(disc_grads, state.disc_opt_state, state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, disc_updates)

  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state, model_state=terms.model_state,
      disc_params=disc_params, disc_batch_stats=disc_aux["batch_stats"], disc_opt_state=disc_opt_state,
      lecam_ema_real=disc_aux["lecam_ema_real"], lecam_ema_fake=disc_aux["lecam_ema_fake"])

  metrics = dict(
      loss=loss, l1=terms.l1, lpips=terms.lpips, gan=terms.gan, gan_weight=gan_weight,
      commitment=terms.output.commitment_loss, disc_loss=disc_loss, hinge=disc_aux["hinge"], lecam=disc_aux["lecam"],
      logits_real=disc_aux["logits_real"], logits_fake=disc_aux["logits_fake"],
      lecam_ema_real=disc_aux["lecam_ema_real"], lecam_ema_fake=disc_aux["lecam_ema_fake"],
      grad_norm=optax.tree.norm(grads), disc_grad_norm=optax.tree.norm(disc_grads),
      codebook_usage=terms.output.usage, perplexity=terms.output.perplexity,
      learning_rate=steps.gen_schedule(state.step), disc_learning_rate=steps.disc_schedule(state.step))
  if config.model.type == "gaussiantoken":
    metrics["scale_max"] = _get_leaf(terms.model_state, SCALE_MAX_PATH)
  return new_state, metrics


@flax.struct.dataclass
class EvalOutput:
  """What `eval_step` returns for one masked batch.

  Attributes:
    metrics: EvalMetrics: per-image PSNR on [0, 1] after clipping, the PSNR of the block-average baseline with as
      many cells as the model has tokens (`block_baseline_cells`) and LPIPS, over the unmasked images.
    code_counts: int32 [codebook_size], how often each code was used by the unmasked images.
    reconstructions: float32 [B, S, S, 3] in [-1, 1], clipped.
    indices, gaussians: the tokens they were decoded from (the model's `ModelOutput` fields; gaussians None for
      the VQ baseline), for pictures: the evaluation draws them from this program instead of running the model
      (and any geometry fit) again.
  """
  metrics: EvalMetrics
  code_counts: jax.Array
  reconstructions: jax.Array
  indices: jax.Array
  gaussians: Any


def reconstruct(model, variables, x, fit_geometry_steps: int = 0) -> models.ModelOutput:
  """The eval-mode forward pass of `model` on x in [-1, 1]; with `fit_geometry_steps` > 0 (GaussianToken), the
  Gaussians' geometry is first fitted to x (`geometry_fit`) and the reconstruction decoded from it."""
  output = model.apply(variables, x, train=False)
  if not fit_geometry_steps:
    return output
  gaussians = geometry_fit.fit_gaussians(model, variables, output.gaussians, x, steps=fit_geometry_steps)
  return output.replace(gaussians=gaussians, reconstruction=model.apply(variables, gaussians, method="decode"))


def eval_step(steps: Steps, ema_params, model_state, batch: dict, lpips_params,
              fit_geometry_steps: int = 0) -> EvalOutput:
  """Reconstructs a masked eval batch {"image", "mask"} with the EMA parameters (train=False), the geometry
  fitted to each image first if `fit_geometry_steps` > 0 (`reconstruct`).

  Pure: `Steps.eval_step` is its jitted form (without fitting).
  """
  config = steps.config
  _check_image_batch("eval_step", batch, config.data.image_size, with_mask=True)
  x = to_model_input(batch["image"])
  mask = batch["mask"]
  output = reconstruct(steps.model, {"params": ema_params, **model_state}, x, fit_geometry_steps)
  x_hat = jnp.clip(output.reconstruction, -1.0, 1.0)
  originals = (x + 1.0) * 0.5
  psnr = image_metrics.psnr(originals, (x_hat + 1.0) * 0.5)
  baseline = image_metrics.psnr(originals, image_metrics.block_average(originals, block_baseline_cells(config)))
  perceptual = losses.lpips_distance(lpips_params, x, x_hat)
  indices = output.indices.reshape(output.indices.shape[0], -1)
  weights = jnp.broadcast_to(mask[:, None], indices.shape).astype(jnp.int32)
  counts = jnp.zeros((config.model.codebook_size,), jnp.int32).at[indices.reshape(-1)].add(weights.reshape(-1))
  metrics = EvalMetrics.single_from_model_output(psnr=psnr, psnr_block_baseline=baseline, lpips=perceptual, mask=mask)
  return EvalOutput(metrics=metrics, code_counts=counts, reconstructions=x_hat, indices=output.indices,
                    gaussians=output.gaussians)


def code_usage_and_perplexity(counts) -> tuple[float, float]:
  """(fraction of codes used at least once, exp of the entropy of the code distribution) from code counts."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return 0.0, math.nan
  probabilities = counts[counts > 0] / total
  return float(np.mean(counts > 0)), float(np.exp(-np.sum(probabilities * np.log(probabilities))))
