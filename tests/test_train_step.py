"""The jitted train and eval steps: every config trains one step; the state created in its shardings; loss
arithmetic, EMAs, schedules, the GAN switch, PSNR and code counts against NumPy; 8 devices against 1 device;
argument checks.

Compiled step functions are cached per (config, devices) for the whole module: each costs one compile.
"""
import functools
import importlib.util
import math
import pathlib

import jax
import numpy as np
import optax
import pytest

from gaussiantoken_jax import losses, xla_options
from gaussiantoken_jax.data import to_global_array
from gaussiantoken_jax.evaluation import evaluator as evaluator_lib
from gaussiantoken_jax.evaluation import pictures as evaluator_pictures
from gaussiantoken_jax.train import distributed, sharding, trainer
from gaussiantoken_jax.train import step as step_lib
from runs import SHARED_STEPS

REPO = pathlib.Path(__file__).resolve().parents[1]
# (config file, variant string): every runlocal config and the plain-VQ baseline; mini_imagenet:runlocal has the
# imagenet:runlocal model (tests/test_model.py) and cifar10's AdamW, so it adds no step of its own.
CONFIGS = [("demo", "runlocal"), ("cifar10", "runlocal"), ("imagenet", "runlocal"), ("demo", "runlocal,baseline=vq")]


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if name == "demo":
    # The shared run's length (tests/runs.py): the schedules are compiled into the step, and at the same length the
    # demo's 8-device step is the program the shared run compiles; a cold suite compiles it once, not twice.
    config.total_steps = SHARED_STEPS
  return config


@functools.cache
def steps_for(name, arg, num_devices=8):
  config = load_config(name, arg)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1), devices=jax.devices()[:num_devices])
  return step_lib.make_steps(config, mesh)


@functools.cache
def lpips_params_on(name, arg, num_devices=8):
  return steps_for(name, arg, num_devices).replicate(losses.load_lpips_params())


def random_images(config, seed, batch_size=None):
  size = config.data.image_size
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch_size or config.batch_size, size, size, 3), dtype=np.uint8)


def run_step(steps, lpips_params, state, images):
  """One train step; returns (host copy of the state before, new state, computed metrics as floats)."""
  before = jax.device_get(state)  # the step donates `state`
  batch = to_global_array({"image": images}, steps.batch_sharding)
  new_state, metrics = steps.train_step(state, batch, lpips_params)
  return before, new_state, {name: float(value) for name, value in metrics.items()}


def timm_cosine_lr(opt, total_steps, t):
  """timm's CosineLRScheduler (per step, warmup_prefix False), in float64."""
  if t < opt.warmup_steps:
    return opt.init_learning_rate + t * (opt.learning_rate - opt.init_learning_rate) / opt.warmup_steps
  return 0.5 * opt.learning_rate * (1.0 + math.cos(math.pi * t / total_steps))


def check_loss_arithmetic(config, metrics):
  loss_cfg = config.loss
  generator = (loss_cfg.l1_weight * metrics["l1"] + loss_cfg.lpips_weight * metrics["lpips"]
               + metrics["gan_weight"] * metrics["gan"] + loss_cfg.commitment_weight * metrics["commitment"])
  np.testing.assert_allclose(metrics["loss"], generator, rtol=1e-5)
  np.testing.assert_allclose(metrics["disc_loss"], metrics["hinge"] + loss_cfg.lecam_weight * metrics["lecam"],
                             rtol=1e-5)


def check_lpips_term(steps, before, images, metrics):
  """The step's LPIPS metric is the batch mean of LPIPS(x, x_hat) on its own train-mode reconstructions, with
  the head dropout drawn from the step's third key, recomputed here on one device from the state before."""
  config = steps.config
  x = images.astype(np.float32) / 127.5 - 1.0
  dropout_key, quantizer_key, lpips_key = jax.random.split(jax.random.fold_in(before.rng, before.step), 3)
  reconstruct = jax.jit(lambda params, model_state, x: steps.model.apply(
      {"params": params, **model_state}, x, train=True, mutable=list(model_state),
      rngs={"dropout": dropout_key, "quantizer": quantizer_key})[0].reconstruction)
  x_hat = reconstruct(before.params, before.model_state, x)
  lpips_each = losses.lpips_distance(losses.load_lpips_params(), x, x_hat, dtype=config.model.conv_dtype,
                                     dropout_rng=lpips_key)
  # Float32 reduction order (8 devices in the step, 1 here) moves the losses by ~1e-6 relative (the 8 vs 1 device
  # test holds them to 2e-5); 1e-4 allows for it. A sum over the batch, or no dropout, misses by far more.
  np.testing.assert_allclose(metrics["lpips"], np.mean(np.asarray(lpips_each, np.float64)), rtol=1e-4)


@pytest.fixture(scope="module")
def demo_first_step():
  """The demo runlocal config's first step on 8 devices: (steps, state before (host), state after, metrics)."""
  steps = steps_for("demo", "runlocal")
  before, after, metrics = run_step(steps, lpips_params_on("demo", "runlocal"), steps.init(),
                                    random_images(steps.config, 0))
  return steps, before, after, metrics


@pytest.mark.parametrize("name, arg", CONFIGS, ids=[f"{n}:{a}" for n, a in CONFIGS])
def test_one_step_of_every_config_is_finite_and_updates_everything(name, arg, demo_first_step):
  if (name, arg) == ("demo", "runlocal"):
    steps, before, after, metrics = demo_first_step
  else:
    steps = steps_for(name, arg)
    before, after, metrics = run_step(steps, lpips_params_on(name, arg), steps.init(), random_images(steps.config, 0))
  config = steps.config
  assert all(math.isfinite(value) for value in metrics.values()), metrics
  assert ("scale_max" in metrics) == (config.model.type == "gaussiantoken")
  if "scale_max" in metrics:  # the schedule's value after the step, read from the new model state
    assert metrics["scale_max"] == float(after.model_state["range_scheduler"]["embedder"]["scale_max"])
  after = jax.device_get(after)
  assert int(after.step) == 1
  # The state keeps the run's key: step t draws from fold_in(key, t), a function of t alone, so a resumed run
  # (or a state set to another step, as the tests below do) draws what an uninterrupted one draws at that step.
  np.testing.assert_array_equal(after.rng, before.rng)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(after))
  # Every trainable leaf of both networks moved (AdamW's decay alone would move the zero-gradient ones).
  for old, new in ((before.params, after.params), (before.disc_params, after.disc_params)):
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  assert bool(after.model_state["codebook"]["quantizer"]["initted"])  # k-means ran on the first batch
  check_loss_arithmetic(config, metrics)
  assert metrics["gan_weight"] == 0.0  # step 0 < gan_start_step
  if (name, arg) == ("cifar10", "runlocal"):  # one config with an LPIPS term (the demo's weight is 0)
    check_lpips_term(steps, before, random_images(config, 0), metrics)
  np.testing.assert_allclose(metrics["learning_rate"], timm_cosine_lr(config.optimizer, config.total_steps, 0),
                             rtol=1e-6)


def test_init_creates_the_state_in_its_shardings_equal_to_a_plain_jitted_init():
  """`Steps.init` (sharded, and on the CPU compiled at LLVM -O1) against `init_train_state` jitted as it is, on
  one device at XLA's default level: the same bits."""
  config = load_config("demo", "runlocal")
  config.mesh.fsdp_min_weight_size = 1024  # so that the larger kernels (and their Adam moments) are fsdp-split
  steps = step_lib.make_steps(config, sharding.make_mesh(dict(data=4, fsdp=2)))
  state = steps.init()
  reference = jax.device_get(jax.jit(functools.partial(step_lib.init_train_state, steps))())
  split = 0
  for (path, got), want_sharding, want in zip(jax.tree_util.tree_leaves_with_path(state),
                                              jax.tree.leaves(steps.state_shardings), jax.tree.leaves(reference)):
    assert got.sharding.is_equivalent_to(want_sharding, got.ndim), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
    if "fsdp" in got.sharding.spec:
      split += 1
      assert {shard.data.size for shard in got.addressable_shards} == {got.size // 2}
  assert split >= 3  # a kernel, its EMA and its Adam moments at least


def test_weight_ema_and_lecam_emas_follow_their_formulas(demo_first_step):
  steps, before, after, metrics = demo_first_step
  config = steps.config
  after = jax.device_get(after)
  decay = config.ema_decay
  for ema0, ema1, param1 in zip(jax.tree.leaves(before.ema_params), jax.tree.leaves(after.ema_params),
                                jax.tree.leaves(after.params)):
    expected = decay * np.float64(ema0) + (1 - decay) * np.float64(param1)
    np.testing.assert_allclose(ema1, expected, rtol=1e-5, atol=1e-7)
  # Initial EMAs are 0, so after one update they are (1 - decay) * the mean logits of this step.
  lecam_decay = config.loss.lecam_decay
  np.testing.assert_allclose([after.lecam_ema_real, after.lecam_ema_fake],
                             [(1 - lecam_decay) * metrics["logits_real"], (1 - lecam_decay) * metrics["logits_fake"]],
                             rtol=1e-5)
  assert metrics["lecam_ema_real"] == after.lecam_ema_real and metrics["lecam_ema_fake"] == after.lecam_ema_fake
  np.testing.assert_array_equal(np.asarray(before.ema_params["decoder"]["conv_out"]["kernel"]),
                                np.asarray(before.params["decoder"]["conv_out"]["kernel"]))


def test_gan_term_switches_on_at_gan_start_step_with_the_scheduled_learning_rates(demo_first_step):
  steps, _, after, _ = demo_first_step
  config = steps.config
  start = config.loss.gan_start_step
  shardings = jax.tree.map(lambda x: x.sharding, steps.abstract_state)
  # One step before gan_start_step the term is still off (the start is not one step early)...
  state = jax.device_put(jax.device_get(after).replace(step=np.int32(start - 1)), shardings)
  _, _, metrics = run_step(steps, lpips_params_on("demo", "runlocal"), state, random_images(config, 1))
  assert metrics["gan_weight"] == 0.0 and metrics["gan"] > 0
  # ...and at gan_start_step it is on.
  state = jax.device_put(jax.device_get(after).replace(step=np.int32(start)), shardings)
  _, new_state, metrics = run_step(steps, lpips_params_on("demo", "runlocal"), state, random_images(config, 1))
  assert int(new_state.step) == start + 1
  assert metrics["gan_weight"] == pytest.approx(config.loss.gan_weight)
  check_loss_arithmetic(config, metrics)
  for key, opt in (("learning_rate", config.optimizer), ("disc_learning_rate", config.disc_optimizer)):
    np.testing.assert_allclose(metrics[key], timm_cosine_lr(opt, config.total_steps, start), rtol=1e-5)


def test_adaptive_gan_weight_equals_vqgan_formula_on_full_gradients():
  """With loss.adaptive_gan_weight the GAN weight is gan_weight * ||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4), W the
  decoder's last kernel; the step takes these from kernel-only gradients, the test from full-tree gradients."""
  config = load_config("demo", "runlocal")
  config.loss.adaptive_gan_weight = True
  mesh = sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1])
  steps = step_lib.make_steps(config, mesh)
  lpips_params = steps.replicate(losses.load_lpips_params())
  state = steps.init()
  state = state.replace(step=jax.device_put(np.int32(config.loss.gan_start_step), state.step.sharding))
  images = random_images(config, 5)

  @jax.jit
  def last_layer_gradients(state, images, lpips_params):
    x = images.astype(np.float32) / 127.5 - 1.0
    keys = tuple(jax.random.split(jax.random.fold_in(state.rng, state.step), 3))
    def losses_of(params):
      terms = step_lib._generator_terms(steps, params, state, x, lpips_params, keys)
      return terms.reconstruction, terms.gan

    _, pullback = jax.vjp(losses_of, state.params)
    cotangents = [(np.float32(1), np.float32(0)), (np.float32(0), np.float32(1))]  # d reconstruction, d gan
    return [pullback(c)[0]["decoder"]["conv_out"]["kernel"] for c in cotangents]

  rec_grad, gan_grad = (np.asarray(g, np.float64) for g in last_layer_gradients(state, images, lpips_params))
  expected = config.loss.gan_weight * np.linalg.norm(rec_grad) / (np.linalg.norm(gan_grad) + 1e-4)
  _, _, metrics = run_step(steps, lpips_params, state, images)
  assert expected > 0
  np.testing.assert_allclose(metrics["gan_weight"], expected, rtol=1e-4)
  check_loss_arithmetic(config, metrics)
  # The adaptive weight multiplies the switch: one step before gan_start_step there is no GAN term.
  early = steps.init()
  early = early.replace(step=jax.device_put(np.int32(config.loss.gan_start_step - 1), early.step.sharding))
  _, _, metrics = run_step(steps, lpips_params, early, images)
  assert metrics["gan_weight"] == 0.0


def assert_same_first_step(first, second):
  """Two first steps from the same init and images, as (metrics, host state), agree to float32 reduction order."""
  (metrics_a, state_a), (metrics_b, state_b) = first, second
  for key in ("loss", "l1", "lpips", "commitment", "disc_loss", "perplexity"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=2e-5, err_msg=key)
  # The gradients themselves, per leaf, for G and D: after one step Adam's first moment is exactly (1 - b1) g.
  # (The parameters cannot show a wrong gradient: Adam's first update is ~ +-lr per weight whatever g's size.)
  # Reduction-order error: the losses agree to 2e-5 relative; a leaf's gradient sums many such terms, so it is
  # held to 1e-3 of that leaf's largest entry, plus 1e-5 of the largest gradient anywhere for leaves whose true
  # gradient is zero (a bias right before a GroupNorm: pure rounding, ~1e-9). A sign-flipped or doubled gradient
  # misses that by ~1000x.
  for tree_a, tree_b in ((state_a.opt_state, state_b.opt_state), (state_a.disc_opt_state, state_b.disc_opt_state)):
    mu_a, mu_b = optax.tree_utils.tree_get(tree_a, "mu"), optax.tree_utils.tree_get(tree_b, "mu")
    largest = max(float(np.abs(b).max()) for b in jax.tree.leaves(mu_b))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mu_a), jax.tree.leaves(mu_b)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(b).max() + 1e-5 * largest,
                                 err_msg=jax.tree_util.keystr(path))
  # The codes are k-means means (10 Lloyd iterations) of features that carry the forward's reduction-order error,
  # the 2e-5 relative tolerance of the losses above; 5x that, relative to the largest code, bounds their drift.
  embed_a, embed_b = (s.model_state["codebook"]["quantizer"]["embed"] for s in (state_a, state_b))
  np.testing.assert_allclose(embed_a, embed_b, rtol=0, atol=5 * 2e-5 * np.abs(embed_b).max())


def test_eight_devices_and_one_device_give_the_same_step(demo_first_step):
  steps8, _, state8, metrics8 = demo_first_step
  steps1 = steps_for("demo", "runlocal", 1)
  _, state1, metrics1 = run_step(steps1, lpips_params_on("demo", "runlocal", 1), steps1.init(),
                                 random_images(steps1.config, 0))
  assert_same_first_step((metrics8, jax.device_get(state8)), (metrics1, jax.device_get(state1)))


@pytest.mark.parametrize("fsdp", [2, 4])
def test_fsdp_step_equals_the_data_parallel_step(fsdp, demo_first_step):
  _, _, state_dp, metrics_dp = demo_first_step
  config = load_config("demo", "runlocal")
  config.mesh.update(data=8 // fsdp, fsdp=fsdp, fsdp_min_weight_size=1024)  # so that the larger kernels split
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  _, state, metrics = run_step(steps, steps.replicate(losses.load_lpips_params()), steps.init(),
                               random_images(config, 0))
  split = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
           if "fsdp" in leaf.sharding.spec]
  assert len(split) >= 3, split  # the weights really are split over the fsdp axis
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    if "fsdp" in leaf.sharding.spec:
      assert {shard.data.size for shard in leaf.addressable_shards} == {leaf.size // fsdp}, jax.tree_util.keystr(path)
  assert_same_first_step((metrics, jax.device_get(state)), (metrics_dp, jax.device_get(state_dp)))


def test_bfloat16_convolutions_train_a_step_close_to_float32(demo_first_step):
  _, _, _, metrics32 = demo_first_step
  config = load_config("demo", "runlocal")
  config.model.conv_dtype = "bfloat16"
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  assert steps.compiler_options == xla_options.LOW_PRECISION_CPU_OPTIONS  # no NaN from XLA:CPU 0.11 (xla_options)
  _, state, metrics = run_step(steps, steps.replicate(losses.load_lpips_params()), steps.init(),
                               random_images(config, 0))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(state)))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))  # the weights stay float32
  # bfloat16 keeps 8 significant bits: each rounded operand is off by up to 2^-9 relative, and through the
  # ~20 convolutions of the runlocal generator and discriminator such errors add up to ~1% on a loss; 3% is
  # allowed. The losses must differ at all (the convolutions really ran in bfloat16).
  for key in ("l1", "disc_loss", "hinge"):
    np.testing.assert_allclose(metrics[key], metrics32[key], rtol=3e-2, err_msg=key)
  assert metrics["l1"] != metrics32["l1"]


def test_eval_step_psnr_lpips_and_code_counts_respect_the_mask(demo_first_step):
  steps, _, after, _ = demo_first_step
  config = steps.config
  images = random_images(config, 3)
  mask = np.arange(config.batch_size) < 5
  batch = to_global_array({"image": images, "mask": mask}, steps.batch_sharding)
  lpips_params = lpips_params_on("demo", "runlocal")
  output = steps.eval_step(after.ema_params, after.model_state, batch, lpips_params)
  metrics, counts, reconstructions = output.metrics, output.code_counts, output.reconstructions
  reconstructions = np.asarray(reconstructions, np.float64)
  assert reconstructions.min() >= -1 and reconstructions.max() <= 1
  originals = images.astype(np.float64) / 255.0
  mse = np.mean(np.square((reconstructions + 1) / 2 - originals), axis=(1, 2, 3))
  psnr = 10 * np.log10(1.0 / mse)
  computed = metrics.compute()
  np.testing.assert_allclose(computed["psnr"], psnr[mask].mean(), rtol=1e-4)
  # The trivial baseline: runlocal has 16 Gaussians, so a 4 x 4 grid of 8 x 8-pixel block means.
  assert config.model.num_gaussians == 16 and config.data.image_size == 32
  blocks = originals.reshape(len(images), 4, 8, 4, 8, 3).mean(axis=(2, 4))
  block_image = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)
  baseline = 10 * np.log10(1.0 / np.mean(np.square(block_image - originals), axis=(1, 2, 3)))
  np.testing.assert_allclose(computed["psnr_block_baseline"], baseline[mask].mean(), rtol=1e-4)
  lpips_each = np.asarray(losses.lpips_distance(jax.device_get(lpips_params), (originals * 2 - 1).astype(np.float32),
                                                reconstructions.astype(np.float32)))
  np.testing.assert_allclose(computed["lpips"], lpips_each[mask].mean(), rtol=1e-4)
  counts = np.asarray(counts)
  assert counts.shape == (config.model.codebook_size,)
  assert counts.sum() == mask.sum() * config.model.num_gaussians  # one code per Gaussian of each valid image


def test_code_usage_and_perplexity():
  usage, perplexity = step_lib.code_usage_and_perplexity(np.array([2, 2, 0, 0]))
  assert usage == 0.5 and perplexity == pytest.approx(2.0)
  usage, perplexity = step_lib.code_usage_and_perplexity(np.array([3, 1]))
  p = np.array([0.75, 0.25])
  assert usage == 1.0 and perplexity == pytest.approx(np.exp(-np.sum(p * np.log(p))))
  assert step_lib.code_usage_and_perplexity(np.zeros(4))[0] == 0.0


def test_bad_batches_raise_value_errors(demo_first_step):
  steps, _, after, _ = demo_first_step
  config = steps.config
  lpips_params = lpips_params_on("demo", "runlocal")
  images = random_images(config, 4)
  with pytest.raises(ValueError, match=r"batch\['image'\].*uint8"):
    steps.train_step(after, to_global_array({"image": images.astype(np.float32)}, steps.batch_sharding), lpips_params)
  with pytest.raises(ValueError, match=r"batch\['image'\].*uint8 \[B, 32, 32, 3\]"):
    steps.train_step(after, to_global_array({"image": images[:, :16, :16]}, steps.batch_sharding), lpips_params)
  with pytest.raises(ValueError, match="`batch` must be a dict with keys"):
    steps.eval_step(after.ema_params, after.model_state, to_global_array({"image": images}, steps.batch_sharding),
                  lpips_params)
  with pytest.raises(ValueError, match="`mesh` must be a jax.sharding.Mesh"):
    step_lib.make_steps(config, None)


def test_initialize_from_env_checks_its_variables():
  assert distributed.initialize_from_env({}) is False  # a single process: nothing to do
  with pytest.raises(ValueError, match="Set all of"):
    distributed.initialize_from_env({distributed.ENV_COORDINATOR: "127.0.0.1:1234"})
  with pytest.raises(ValueError, match="must be an integer"):
    distributed.initialize_from_env({distributed.ENV_COORDINATOR: "127.0.0.1:1234",
                                     distributed.ENV_NUM_PROCESSES: "two", distributed.ENV_PROCESS_ID: "0"})
  with pytest.raises(ValueError, match=r"must be in \[0,"):
    distributed.initialize_from_env({distributed.ENV_COORDINATOR: "127.0.0.1:1234",
                                     distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "2"})
  with pytest.raises(ValueError, match="'auto' or unset"):
    distributed.initialize_from_env({distributed.ENV_AUTO: "yes"})


@pytest.fixture(scope="module")
def demo_second_step(demo_first_step):
  """Step 2 of the demo runlocal run from a state with nonzero LeCAM EMAs: (steps, state before (host), after,
  metrics). The EMAs are set by hand so that their decay is part of what the step is checked against."""
  steps, _, after, _ = demo_first_step
  state = jax.device_get(after).replace(lecam_ema_real=np.float32(0.25), lecam_ema_fake=np.float32(-0.4))
  state = jax.device_put(state, steps.state_shardings)
  before, after, metrics = run_step(steps, lpips_params_on("demo", "runlocal"), state, random_images(steps.config, 6))
  return steps, before, jax.device_get(after), metrics


def test_discriminator_step_equals_its_formulas_on_independently_computed_logits(demo_second_step):
  """D's BatchNorm statistics after the step are those of D(x) then D(x_hat) from the old ones (the generator
  pass's own update is dropped), and its hinge, LeCAM and EMAs equal the formulas in float64 on logits computed
  here from the state before the step."""
  steps, before, after, metrics = demo_second_step
  config = steps.config
  x = random_images(config, 6).astype(np.float32) / 127.5 - 1.0
  dropout_key, quantizer_key, _ = jax.random.split(jax.random.fold_in(before.rng, before.step), 3)

  @jax.jit
  def discriminator_outputs(before, x):
    output, _ = steps.model.apply({"params": before.params, **before.model_state}, x, train=True,
                                  mutable=list(before.model_state),
                                  rngs={"dropout": dropout_key, "quantizer": quantizer_key})
    real, stats = steps.discriminator.apply({"params": before.disc_params, "batch_stats": before.disc_batch_stats},
                                            x, train=True, mutable=["batch_stats"])
    fake, stats = steps.discriminator.apply({"params": before.disc_params, **stats}, output.reconstruction,
                                            train=True, mutable=["batch_stats"])
    return real, fake, stats["batch_stats"]

  real, fake, batch_stats = discriminator_outputs(before, x)
  # The logits carry the forward's float32 reduction-order error (8 devices in the step, 1 here): ~1e-6 relative,
  # held to 1e-4. One BatchNorm update too many moves the running statistics by (1 - momentum) of a batch's.
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(after.disc_batch_stats),
                               jax.tree.leaves(batch_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  decay = config.loss.lecam_decay
  ema_real = decay * 0.25 + (1 - decay) * real.mean()
  ema_fake = decay * -0.4 + (1 - decay) * fake.mean()
  hinge = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
  lecam = np.mean(np.maximum(real - ema_fake, 0) ** 2) + np.mean(np.maximum(ema_real - fake, 0) ** 2)
  assert lecam > 0.01  # both EMAs were set so that both of LeCAM's terms count
  np.testing.assert_allclose([metrics["hinge"], metrics["lecam"], float(after.lecam_ema_real),
                              float(after.lecam_ema_fake)], [hinge, lecam, ema_real, ema_fake], rtol=1e-4)
  np.testing.assert_allclose(metrics["disc_loss"], hinge + config.loss.lecam_weight * lecam, rtol=1e-4)
  # The generator's GAN loss is on D(x_hat) in train mode too (BatchNorm on the batch's own statistics, so the
  # running statistics it starts from do not matter): softplus(-mean logit) per image, averaged over images.
  per_image = fake.mean(axis=(1, 2, 3))
  gan = np.mean(np.logaddexp(0.0, -per_image))
  np.testing.assert_allclose(metrics["gan"], gan, rtol=1e-4)


def test_weight_ema_moves_towards_the_updated_parameters(demo_second_step):
  """ema <- decay * ema + (1 - decay) * params after the update, on step 2, where the learning rate (2e-4, against
  1e-6 on step 1) moves the parameters enough for an EMA towards the old ones to show."""
  steps, before, after, _ = demo_second_step
  decay = steps.config.ema_decay
  moved = 0.0
  for (path, ema0), ema1, param0, param1 in zip(jax.tree_util.tree_leaves_with_path(before.ema_params),
                                                jax.tree.leaves(after.ema_params), jax.tree.leaves(before.params),
                                                jax.tree.leaves(after.params)):
    ema0, ema1, param0, param1 = (np.asarray(x, np.float64) for x in (ema0, ema1, param0, param1))
    # float32 rounds ema - params, (1 - decay) and their product (2^-24 relative each, on (1 - decay) |ema -
    # params|) and the new EMA (2^-24 |ema1|): 2^-22 of the two magnitudes bounds it with a margin.
    bound = 2 ** -22 * (np.abs(ema1) + (1 - decay) * np.abs(ema0 - param1)) + 1e-30
    error = np.abs(ema1 - (decay * ema0 + (1 - decay) * param1))
    assert np.all(error <= bound), (jax.tree_util.keystr(path), float(np.max(error / bound)))
    moved = max(moved, float(np.max((1 - decay) * np.abs(param1 - param0) / bound)))
  assert moved > 100  # an EMA of the old parameters would miss by this many bounds


def test_the_optimizer_states_the_step_updated_are_the_ones_it_returns(demo_second_step):
  """G's and D's optax states after the second step count two updates, and their Adam moments moved: the next
  step, and a run resumed from a checkpoint, continue from the state this step updated. (A step that returned the
  state it started from would still train, each update taken as Adam's first at the schedule's first rate, and
  an uninterrupted and a resumed run would agree; the checks above read the parameters and the metrics only.)"""
  _, before, after, _ = demo_second_step
  assert int(before.step) == 1 and int(after.step) == 2
  for name in ("opt_state", "disc_opt_state"):
    # Adam's bias-correction count and the schedule's count (optax's own step counters), one per update.
    counts = optax.tree_utils.tree_get_all_with_path(getattr(after, name), "count")
    assert len(counts) == 2 and all(int(count) == 2 for _, count in counts), (name, counts)
    for moment in ("mu", "nu"):
      old, new = (jax.tree.leaves(optax.tree_utils.tree_get(getattr(state, name), moment)) for state in (before, after))
      assert any(not np.array_equal(a, b) for a, b in zip(old, new)), (name, moment)


def test_trainer_evaluates_the_ema_weights(demo_second_step):
  steps, _, after, _ = demo_second_step
  lpips_params = lpips_params_on("demo", "runlocal")
  # EMA weights far from the trained ones: the decoder's output layer zeroed, so every reconstruction is grey.
  ema_params = jax.tree_util.tree_map_with_path(
      lambda path, p: np.zeros_like(p) if "conv_out" in jax.tree_util.keystr(path) else p, after.params)
  state = jax.device_put(after.replace(ema_params=ema_params), steps.state_shardings)
  batch = {"image": random_images(steps.config, 7), "mask": np.ones(steps.config.batch_size, bool)}
  results, pictures = trainer.evaluate(evaluator_lib.Evaluator(steps, lpips_params), state, [batch])

  def psnr_with(params):
    metrics = steps.eval_step(params, state.model_state, to_global_array(batch, steps.batch_sharding),
                              lpips_params).metrics
    return float(metrics.compute()["psnr"])

  assert results["psnr"] == pytest.approx(psnr_with(state.ema_params), rel=1e-6)
  assert abs(results["psnr"] - psnr_with(state.params)) > 0.1
  assert pictures["reconstructions"].dtype == np.uint8
  # Pictures come from as many batches as it takes: 3 unmasked images in the first, 5 shown.
  few = {**batch, "mask": np.arange(steps.config.batch_size) < 3}
  _, pictures = trainer.evaluate(evaluator_lib.Evaluator(steps, lpips_params, num_pictures=5), state, [few, batch])
  size = steps.config.data.image_size
  blank = np.zeros((5, size, size, 3), np.uint8)
  assert pictures["reconstructions"].shape == evaluator_pictures.reconstruction_grid(blank, blank).shape
