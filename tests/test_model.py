"""The assembled tokenizer: dry-run parameter counts against the reference, forward/backward, token decoding."""
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax import models, overview

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def embedder_reference_used(k, z):
  """The reference's 0.79M embedder count minus what it builds but never runs.

  reference-implementation.md section 8 counts a `to_features` head (2 x [Dense 64->64, Dense 64->64, LN] +
  Dense 64->z + a per-dim scale) in each of the 3 refinement blocks; only the last one is used, so this port
  builds only that one (docs/differences.md). The anchors are K x 69.
  """
  to_features = 2 * (2 * (64 * 64 + 64) + 2 * 64) + (64 * z + z) + z
  reference = 790_000 - 64 * 69 + k * 69  # the 0.79M figure is for K = 64
  return reference - 2 * to_features


@pytest.mark.parametrize("name, generator, embedder_k_z", [
    ("cifar10", 24.5e6, (64, 3)),
    ("imagenet", 112.8e6, (256, 8)),
])
def test_dry_run_parameter_counts_match_reference(name, generator, embedder_k_z):
  """reference-implementation.md section 8: generator 24.5M / 112.8M, discriminator 2.77M."""
  if name == "cifar10":  # the real command line, once; the library function for the other config
    out = subprocess.run([sys.executable, "-m", "gaussiantoken_jax.main", f"--config=configs/{name}.py",
                          "--dry_run"], cwd=REPO, capture_output=True, text=True, check=True, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert "encoder" in out.stdout and "discriminator" in out.stdout  # the readable overview came first
  else:
    _, summary = overview.dry_run(load_config(name))
  params = summary["params"]
  assert set(params) == {"encoder", "embedder", "quantizer", "decoder", "discriminator"}
  total = params["encoder"] + params["embedder"] + params["decoder"]
  assert abs(total / generator - 1) < 0.03, total
  assert abs(params["embedder"] / embedder_reference_used(*embedder_k_z) - 1) < 0.03, params["embedder"]
  assert abs(params["discriminator"] / 2.77e6 - 1) < 0.03, params["discriminator"]
  k, z = embedder_k_z
  assert params["quantizer"] == 1024 * z  # the codebook
  # Forward FLOPs: the reference estimates 8.1 GMACs (CIFAR) and 499 GMACs (ImageNet) per image.
  assert abs(summary["gflops_per_image"] / (2 * (8.1 if name == "cifar10" else 499.0)) - 1) < 0.1


@functools.lru_cache(maxsize=None)
def runlocal_setup(name, arg):
  config = load_config(name, arg)
  model = models.build_model(config)
  size = config.data.image_size
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1), "quantizer": jax.random.key(2)}
  variables = jax.jit(functools.partial(model.init, train=False))(rngs, images)
  return config, model, images, variables


def jitted_apply(model, method="__call__", **kwargs):
  """model.apply(variables, *args, method=method, **kwargs), jitted: run eagerly, each of the model's small ops
  would compile a program of its own (several seconds per call at runlocal sizes)."""
  return jax.jit(lambda variables, *args: model.apply(variables, *args, method=method, **kwargs))


def test_mini_imagenet_runlocal_is_the_imagenet_runlocal_model():
  """Its data and optimizer differ, its model does not: the per-config step tests cover it through imagenet."""
  assert load_config("mini_imagenet", "runlocal").model.to_dict() == load_config("imagenet", "runlocal").model.to_dict()


def test_forward_backward_of_the_imagenet_baseline_runlocal_config_is_finite():
  """The other runlocal configs get these checks, and more, through a whole train step (tests/test_train_step.py)."""
  config, model, images, variables = runlocal_setup("imagenet", "runlocal,baseline=vq")
  state = {k: v for k, v in variables.items() if k != "params"}
  rngs = {"dropout": jax.random.key(3), "quantizer": jax.random.key(4)}

  @jax.jit
  def loss_and_grads(params):
    def loss_fn(p):
      out, new_state = model.apply({"params": p, **state}, images, train=True, rngs=rngs, mutable=list(state))
      loss = jnp.mean(jnp.abs(out.reconstruction - images)) + 0.25 * out.commitment_loss
      return loss, (out, new_state)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (out, new_state)), grads = loss_and_grads(variables["params"])
  size = config.data.image_size
  assert out.reconstruction.shape == (2, size, size, 3)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Every trainable parameter gets a gradient signal somewhere in the encoder, embedder and decoder.
  for component in grads:
    assert float(optax_global_norm(grads[component])) > 0, component
  # Training updated the codebook state (k-means init on the first call).
  assert bool(new_state["codebook"]["quantizer"]["initted"])
  if config.model.type == "vq":
    h = size // 2 ** (len(config.model.encoder_ch_mult) - 1)
    assert out.indices.shape == (2, h * h) and out.gaussians is None
  else:
    assert out.indices.shape == (2, config.model.num_gaussians)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def test_decoding_tokens_reproduces_the_forward_pass():
  """Tokens (indices + geometry) carry everything the decoder needs: decode(encode(x)) == model(x)."""
  config, model, images, variables = runlocal_setup("demo", "runlocal")
  # A random codebook: the initial one is all zeros, under which every token decodes to the same zero features.
  codebook = dict(variables["codebook"]["quantizer"])
  codebook["embed"] = jax.random.normal(jax.random.key(5), codebook["embed"].shape)
  variables = {**variables, "codebook": {"quantizer": codebook}}
  out = jitted_apply(model, train=False)(variables, images)
  indices, g = jitted_apply(model, "encode_tokens")(variables, images)
  np.testing.assert_array_equal(indices, out.indices)
  assert len(np.unique(indices)) > 1  # the tokens differ, so a mix-up of them shows
  # The tokens' Gaussians are the forward pass's, features quantized (the codes of their indices). Two programs
  # (jits) of the same float32 graph: equal up to a few roundings of values of size ~1.
  for name in ("means", "rotations", "scales", "features"):
    np.testing.assert_allclose(getattr(g, name), getattr(out.gaussians, name), atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(g.features, np.asarray(codebook["embed"])[np.asarray(indices)])
  decoded = jitted_apply(model, "decode_indices")(variables, indices, g.means, g.rotations, g.scales)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(out.reconstruction), atol=1e-5)
  assert_statistics_are_those_of_the_tokens(out, config.model.codebook_size)


def assert_statistics_are_those_of_the_tokens(out, codebook_size):
  """The perplexity and usage a forward pass reports, each in its own field, from the histogram of its indices."""
  counts = np.bincount(np.asarray(out.indices).ravel(), minlength=codebook_size)
  probs = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(out.perplexity, np.exp(-np.sum(probs * np.log(probs))), rtol=1e-5)
  np.testing.assert_allclose(out.usage, np.mean(counts > 0), rtol=1e-6)


def test_decode_splats_each_gaussian_field_in_its_own_slot():
  """decode = decoder(splat(means, rotations, scales, features)), the splat taken from the float64 formula.

  Means and scales have the same shape, so only values tell a swap apart: random Gaussians with scales of 0.4-3
  pixels and centres across the map make any mix-up of the fields change the decoder's input. The model's cutoff
  is set to 0.1, not the splat's default 1/255, so that a cutoff the model does not pass on shows as well.
  """
  from test_splatting import random_gaussians, splat_np
  config, model, _, variables = runlocal_setup("demo", "runlocal")
  model = model.clone(splat_cutoff=0.1)
  means, rotations, scales, features = random_gaussians(0, 2, config.model.num_gaussians, config.model.feature_dim)
  gaussians = models.Gaussians(means=jnp.asarray(means), rotations=jnp.asarray(rotations),
                               scales=jnp.asarray(scales), features=jnp.asarray(features))
  decoded = jitted_apply(model, "decode")(variables, gaussians)
  h, w = model.feature_shape
  feature_map = splat_np(*(np.asarray(a, np.float64) for a in (means, rotations, scales, features)), h, w,
                         cutoff=0.1)
  expected = jitted_apply(model, lambda m, f: m.decoder(f))(variables, jnp.asarray(feature_map, jnp.float32))
  # float32 splat against float64 (relative ~1e-6), carried through a small conv decoder: 1e-4 is generous.
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(expected), atol=1e-4)


def test_baseline_tokens_decode_to_the_forward_pass():
  config, model, images, variables = runlocal_setup("demo", "runlocal,baseline=vq")
  out = jitted_apply(model, train=False)(variables, images)
  decoded = jitted_apply(model, "decode_indices")(variables, out.indices)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(out.reconstruction), atol=1e-5)
  assert_statistics_are_those_of_the_tokens(out, config.model.codebook_size)


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 16, 16, 3), np.float32), r"`images` must have shape \[B, 32, 32, 3\].*got shape \(2, 16, 16, 3\)"),
    (np.zeros((32, 32, 3), np.float32), r"`images` must have shape \[B, 32, 32, 3\]"),
    (np.zeros((2, 32, 32, 3), np.uint8), r"must be floating point in \[-1, 1\], got dtype uint8"),
])
def test_bad_images_raise_clear_errors(images, match):
  _, model, _, variables = runlocal_setup("demo", "runlocal")
  with pytest.raises(ValueError, match=match):
    model.apply(variables, images, train=False)


def test_unknown_model_type_and_variant_are_rejected():
  config = load_config("demo", "runlocal")
  config.model.type = "vqvae"
  with pytest.raises(ValueError, match=r"config.model.type must be one of \('gaussiantoken', 'vq'\), got 'vqvae'"):
    models.build_model(config)
  with pytest.raises(ValueError, match=r"Unknown config variant 'fast'"):
    load_config("demo", "fast")
  with pytest.raises(ValueError, match=r"Unknown baseline 'vqvae'"):
    load_config("demo", "baseline=vqvae")
