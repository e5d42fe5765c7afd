"""GaussianTokenizer and Tokens on a real (tiny) training run: the demo's `:runlocal` trained for a few steps
through the command line, and a freshly initialised plain-VQ baseline checkpoint. The token export reads an
image folder, and the tiny ArrayRecord TFDS dataset of tests/test_data_pipeline.py (in one process and in two).

The training run is the session's shared one (tests/runs.py), which tests/test_trainer.py checks as its run A.
"""
import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

import gaussiantoken_jax
from gaussiantoken_jax import data, pixels, restore, tokenize
from gaussiantoken_jax.tokenizer import GaussianTokenizer, Tokens
from gaussiantoken_jax.train import checkpointing, sharding
from gaussiantoken_jax.train import step as step_lib
from test_data_pipeline import GaussiantokenTestImages
from runs import REPO, SHARED_EVERY as EVERY, SHARED_STEPS as TOTAL, load_demo_config, run_processes, subprocess_env


@pytest.fixture(scope="module")
def workdir(runlocal_run):
  """The session's shared `:runlocal` run (tests/runs.py): TOTAL steps, a checkpoint every EVERY."""
  workdir, returncode = runlocal_run
  assert returncode == 0, (workdir / "log.txt").read_text()[-3000:]
  return workdir


@pytest.fixture(scope="module")
def tokenizer(workdir):
  return GaussianTokenizer.from_checkpoint(workdir)


@pytest.fixture(scope="module")
def images():
  """The first 8 held-out demo photographs, uint8 [8, 32, 32, 3]."""
  return np.asarray(next(iter(data.make_eval_loader(load_demo_config("runlocal"))))["image"][:8])


@pytest.fixture(scope="module")
def saved_state(workdir):
  """The whole saved TrainState of the last step, through the training-side restore (not the tokenizer's)."""
  config = load_demo_config("runlocal")
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    return steps, jax.device_get(ckpt.restore(steps.abstract_state).state)


@pytest.fixture(scope="module")
def vq_workdir(tmp_path_factory):
  """A freshly initialised plain-VQ baseline, saved as training saves it (its codebook is the init's)."""
  config = load_demo_config("runlocal,baseline=vq")
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  state = steps.init()
  workdir = tmp_path_factory.mktemp("vq_run")
  with checkpointing.Checkpointer(workdir) as ckpt:
    ckpt.save(0, state, config=config)
  return workdir, steps, state


def eval_reconstruction(steps, params, model_state, images):
  """What the eval step reconstructs: the model in eval mode on to_model_input(images), clipped to [-1, 1].

  The batch is split over the mesh as the eval step and the tokenizer split it: a program that holds all 8 images
  on one device sums its convolutions in another order, and its pixels differed from the tokenizer's by up to
  1.5e-5 after the decoder.
  """
  apply = jax.jit(lambda p, s, x: steps.model.apply({"params": p, **s}, pixels.to_model_input(x), train=False))
  output = apply(steps.replicate(params), steps.replicate(model_state), jax.device_put(images, steps.batch_sharding))
  return output, np.clip(np.asarray(output.reconstruction), -1.0, 1.0)


def assert_tokens_equal(a: Tokens, b: Tokens):
  for name in ("indices", "means", "rotations", "scales"):
    x, y = getattr(a, name), getattr(b, name)
    assert (x is None) == (y is None), name
    if x is not None:
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape, name
      np.testing.assert_array_equal(x, y, err_msg=name)


def test_round_trip_equals_the_eval_reconstruction_of_the_ema_model(tokenizer, saved_state, images):
  steps, state = saved_state
  assert tokenizer.step == TOTAL and tokenizer.model_type == "gaussiantoken"
  k = tokenizer.num_tokens
  tokens = tokenizer.encode(images)
  assert tokens.indices.dtype == jnp.int32 and tokens.indices.shape == (8, k)
  assert tokens.means.shape == (8, k, 2) and tokens.rotations.shape == (8, k) and tokens.scales.shape == (8, k, 2)
  decoded = tokenizer.decode(tokens)
  assert decoded.dtype == jnp.float32 and decoded.shape == images.shape

  output, expected = eval_reconstruction(steps, state.ema_params, state.model_state, images)
  np.testing.assert_array_equal(np.asarray(tokens.indices), np.asarray(output.indices))
  for name in ("means", "rotations", "scales"):
    np.testing.assert_allclose(np.asarray(getattr(tokens, name)), np.asarray(getattr(output.gaussians, name)),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  # The forward pass decodes the straight-through features (x + (code - x)), the tokens the codes themselves: at
  # most one rounding apart, and moving every codebook entry by one ulp moved the decoded pixels of this run by at
  # most 2.1e-6, hence 1e-5.
  np.testing.assert_allclose(np.asarray(decoded), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokenizer.reconstruct(images)), np.asarray(decoded))

  # Inside one's own jit: the pure forms with the parameters as an argument, and the methods themselves.
  # The batch split over the mesh as `encode` splits it (see eval_reconstruction); one XLA program: other fusions.
  split = jax.device_put(images, sharding.batch_sharding(tokenizer.mesh))
  pure = jax.jit(lambda v, x: tokenizer.decode_fn(v, tokenizer.encode_fn(v, x)))(tokenizer.variables, split)
  np.testing.assert_allclose(np.asarray(pure), np.asarray(decoded), atol=1e-5)
  traced = jax.jit(lambda x: tokenizer.encode(x).indices)(jnp.asarray(images))
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(tokens.indices))


def test_fitting_the_geometry_lowers_every_images_error_and_is_what_evaluation_measures(tokenizer, images):
  steps = 5
  x = np.asarray(pixels.to_model_input(images))
  plain = tokenizer.encode(images)
  fitted = tokenizer.encode(images, fit_geometry_steps=steps)
  np.testing.assert_array_equal(np.asarray(fitted.indices), np.asarray(plain.indices))  # the codes are kept
  assert float(jnp.max(jnp.abs(fitted.means))) <= 1.0
  scale_max = float(tokenizer.variables["range_scheduler"]["embedder"]["scale_max"])
  assert tokenizer.config.model.embedder.scale_min <= float(jnp.min(fitted.scales))
  assert float(jnp.max(fitted.scales)) <= scale_max
  reconstruction = np.asarray(tokenizer.decode(fitted))
  l1_plain = np.abs(np.asarray(tokenizer.decode(plain)) - x).mean(axis=(1, 2, 3))
  l1_fitted = np.abs(reconstruction - x).mean(axis=(1, 2, 3))
  # Measured: 1.5-3.9% lower for each of the 8 photos after 5 steps (of a barely trained model, L1 ~0.36).
  assert np.all(l1_fitted < 0.995 * l1_plain), (l1_plain, l1_fitted)
  # Evaluation (`eval_step` and its pictures) reconstructs through train.step.reconstruct: the same fit. A separate
  # program fuses differently and Adam's normalised steps carry such float32 differences into the geometry
  # (measured 4e-5 on the pixels); fitted and unfitted reconstructions differ by ~0.1. Near a tie the difference
  # can flip one image's keep-or-undo decision of a step, and its fit then ends at another point of nearly the
  # same loss (JAX 0.12: one image of 8, 0.013 apart on the pixels, its L1 1.2e-5 apart, relative). One step more
  # or fewer moves every image's L1 by more than 1e-4 (up to 0.5%) and its pixels by 0.075-0.18.
  evaluated = jax.jit(lambda variables, x: step_lib.reconstruct(tokenizer.model, variables, x, steps))(
      tokenizer.variables, x)  # jitted as eval_step jits it (eagerly each small op compiles a program of its own)
  evaluated = np.clip(np.asarray(evaluated.reconstruction), -1.0, 1.0)
  apart = np.abs(evaluated - reconstruction).max(axis=(1, 2, 3))
  assert np.sum(apart > 1e-3) <= 1, apart
  np.testing.assert_allclose(np.abs(evaluated - x).mean(axis=(1, 2, 3)), l1_fitted, rtol=1e-4)
  assert np.abs(reconstruction - np.asarray(tokenizer.decode(plain))).max() > 0.05
  with pytest.raises(ValueError, match=r"encode: `fit_geometry_steps` must be a non-negative int, got -1"):
    tokenizer.encode(images, fit_geometry_steps=-1)
  with pytest.raises(ValueError, match=r"encode: `fit_learning_rate` must be a positive finite float, got 0"):
    tokenizer.encode(images, fit_geometry_steps=steps, fit_learning_rate=0)


def test_ema_or_raw_parameters_and_every_form_of_the_path(workdir, tokenizer, saved_state):
  _, state = saved_state
  params = jax.device_get(tokenizer.variables["params"])
  jax.tree.map(np.testing.assert_array_equal, params, state.ema_params)
  raw = GaussianTokenizer.from_checkpoint(workdir / "checkpoints", use_ema=False)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw.variables["params"]), state.params)
  # After 8 steps the EMA (decay 0.99) is still mostly the init: the two must differ.
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
  older = GaussianTokenizer.from_checkpoint(workdir / "checkpoints" / str(TOTAL - EVERY))
  assert older.step == TOTAL - EVERY
  assert GaussianTokenizer.from_checkpoint(workdir, step=TOTAL - EVERY).step == TOTAL - EVERY
  assert gaussiantoken_jax.GaussianTokenizer is GaussianTokenizer and gaussiantoken_jax.Tokens is Tokens


def test_a_run_whose_mesh_does_not_fit_the_devices_here_restores_data_parallel(workdir, saved_state):
  """A run trained with fsdp=3 (on 3, 6, ... devices) restored on these 8: the batch over all 8, the same weights."""
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    config = ml_collections.ConfigDict(ckpt.restore_config())
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match=r"8 devices are not divisible by the fixed axis size 3"):
    sharding.make_mesh(config.mesh)
  restored = restore.restore_model(workdir, config=config)
  assert dict(restored.steps.mesh.shape) == {"data": 8, "fsdp": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_state[1].ema_params)


def test_uint8_and_the_equivalent_floats_give_the_same_tokens(tokenizer, images):
  images = images.copy()
  images[0, 0, 0], images[0, 0, 1] = 0, 255  # the ends of the range: -1 and 1 are valid floats
  tokens = tokenizer.encode(images)
  # Scaled as the tokenizer scales uint8: bit-identical tokens.
  assert_tokens_equal(tokenizer.encode(np.asarray(pixels.to_model_input(images))), tokens)
  # Scaled on the host (XLA's scaling may differ from numpy's by one float32 ulp): the same codes, the same
  # geometry up to rounding.
  on_host = (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
  assert on_host.min() == -1.0 and on_host.max() == 1.0
  floats = tokenizer.encode(on_host)
  np.testing.assert_array_equal(np.asarray(floats.indices), np.asarray(tokens.indices))
  for name in ("means", "rotations", "scales"):
    np.testing.assert_allclose(np.asarray(getattr(floats, name)), np.asarray(getattr(tokens, name)), atol=1e-5)
  # A batch that does not divide over the 8 devices (12) is encoded as it is, not split: each image's tokens as in
  # the batch of 8 (the geometry up to another program's rounding, as above).
  twelve = tokenizer.encode(np.concatenate([images, images[:4]]))
  assert twelve.indices.shape == (12, tokenizer.num_tokens)
  for name in ("indices", "means", "rotations", "scales"):
    np.testing.assert_allclose(np.asarray(getattr(twelve, name)),
                               np.concatenate([getattr(tokens, name), getattr(tokens, name)[:4]]), atol=1e-5)


def test_tokens_save_and_load_bit_exactly(tokenizer, images, tmp_path):
  tokens = tokenizer.encode(images)
  # Tokens stay split over the batch like the images: a replicated result would mean every device encoded
  # the whole batch (a gather over the batch-flattened map once did that), and decoding them would compile
  # another program than decoding the loaded (split) copies, with other rounding.
  for leaf in jax.tree.leaves(tokens):
    assert leaf.sharding.is_equivalent_to(sharding.batch_sharding(tokenizer.mesh), leaf.ndim), leaf.sharding
  path = tmp_path / "tokens.npz"
  tokens.save(path)
  loaded = Tokens.load(path)
  assert_tokens_equal(loaded, tokens)
  assert loaded.means.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(tokenizer.decode(loaded)), np.asarray(tokenizer.decode(tokens)))
  # Tokens are a pytree: they pass through jax.tree functions and keep their class.
  assert jax.tree.map(lambda x: x, loaded).__class__ is Tokens and len(jax.tree.leaves(loaded)) == 4

  np.savez(tmp_path / "other.npz", indices=np.zeros((1, 3), np.int32), colour=np.zeros(3))
  with pytest.raises(ValueError, match=r"not a tokens file.*got \['colour', 'indices'\]"):
    Tokens.load(tmp_path / "other.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    Tokens.load(tmp_path / "missing.npz")
  # Files that are not .npz archives: a ValueError naming the file, whatever numpy makes of them.
  (tmp_path / "text.npz").write_bytes(b"not an archive")
  (tmp_path / "truncated.npz").write_bytes(path.read_bytes()[:200])
  np.save(tmp_path / "array.npy", np.zeros(3))
  for name, error in (("text.npz", "is not an .npz archive: it does not start as a zip file does"),
                      ("array.npy", "is not an .npz archive: it does not start as a zip file does"),
                      ("truncated.npz", r"is not a readable .npz archive \(BadZipFile")):
    with pytest.raises(ValueError, match=f"{tmp_path / name} {error}"):
      Tokens.load(tmp_path / name)


def test_the_vq_baseline_restores_through_the_same_class(vq_workdir, images, tmp_path):
  workdir, steps, state = vq_workdir
  tokenizer = GaussianTokenizer.from_checkpoint(workdir)
  assert tokenizer.model_type == "vq" and not tokenizer.has_geometry
  tokens = tokenizer.encode(images)
  h, w = steps.model.feature_shape
  assert tokens.indices.shape == (8, h * w) and tokenizer.num_tokens == h * w
  assert tokens.means is None and tokens.rotations is None and tokens.scales is None
  output, expected = eval_reconstruction(steps, state.ema_params, state.model_state, images)
  np.testing.assert_array_equal(np.asarray(tokens.indices), np.asarray(output.indices))
  np.testing.assert_allclose(np.asarray(tokenizer.decode(tokens)), expected, atol=1e-5)
  tokens.save(tmp_path / "vq.npz")
  assert_tokens_equal(Tokens.load(tmp_path / "vq.npz"), tokens)
  with pytest.raises(ValueError, match=r"plain-VQ baseline, whose tokens are indices only; got \['means'\]"):
    tokenizer.decode(tokens.replace(means=np.zeros((8, h * w, 2), np.float32)))
  with pytest.raises(ValueError, match=r"`fit_geometry_steps`=5, but this plain-VQ baseline's tokens have no geometry"):
    tokenizer.encode(images, fit_geometry_steps=5)


def test_both_models_decode_tokens_through_one_interface(vq_workdir, tokenizer):
  _, steps, state = vq_workdir
  variables = {"params": state.ema_params, **state.model_state}
  indices = jnp.zeros((1, tokenizer.num_tokens), jnp.int32)
  with pytest.raises(ValueError, match=r"VQBaseline.decode_indices: .*indices only; got means=\(1, 16, 2\)"):
    steps.model.apply(variables, indices, jnp.zeros((1, 16, 2)), method="decode_indices")
  with pytest.raises(ValueError, match=r"GaussianToken.decode_indices: tokens need `means`.*got means=None"):
    tokenizer.model.apply(tokenizer.variables, indices, method="decode_indices")


def _bad_images(images):
  float_images = np.asarray(pixels.to_model_input(images))
  with_nan, too_large = float_images.copy(), float_images.copy()
  with_nan[3, 4, 5, 1] = np.nan
  too_large[0, 0, 0, 0], too_large[5, 1, 2, 2] = 1.5, -3.0
  return [
      (images[0], r"must have shape \[B, 32, 32, 3\] .*got shape \(32, 32, 3\)"),
      (images[:, :16, :16], r"must have shape \[B, 32, 32, 3\] .*got shape \(8, 16, 16, 3\)"),
      (np.concatenate([images, images[..., :1]], -1), r"3 channels\), got shape \(8, 32, 32, 4\)"),
      (images.astype(np.int32), r"uint8 \(0..255\) or floating point in \[-1, 1\], got dtype int32"),
      (too_large, r"must lie in \[-1, 1\] .*got values in \[-3, 1.5\]"),
      (jnp.asarray(images, jnp.float32), r"must lie in \[-1, 1\] .*got values in \[\d+, \d+\]"),
      (with_nan, r"`images` contains NaN"),
      (jnp.asarray(with_nan), r"`images` contains NaN"),  # device arrays are summarised on the device
      (images.tolist(), r"must be an array of shape \[B, 32, 32, 3\], got list"),
  ]


def test_bad_images_raise_value_errors_naming_the_problem(tokenizer, images):
  for bad, message in _bad_images(images):
    with pytest.raises(ValueError, match=r"GaussianTokenizer.encode: .*" + message):
      tokenizer.encode(bad)


def test_bad_tokens_raise_value_errors_naming_the_problem(tokenizer, images):
  tokens = jax.device_get(tokenizer.encode(images))
  k, size = tokenizer.num_tokens, tokenizer.codebook_size
  out_of_range, negative = tokens.indices.copy(), tokens.indices.copy()
  out_of_range[2, 3] = size
  negative[0, 0] = -1
  cases = [
      (tokens.replace(indices=out_of_range), rf"must lie in \[0, {size}\) \(the codebook size\), got values in "
                                             rf"\[\d+, {size}\]"),
      (tokens.replace(indices=negative), rf"must lie in \[0, {size}\).*got values in \[-1, "),
      (tokens.replace(means=np.where(np.arange(k)[None, :, None] == 3, np.nan, tokens.means)),
       r"`tokens.means` must be finite, got 16 NaN or Inf values"),
      (tokens.replace(rotations=np.where(np.arange(k)[None, :] == 5, -np.inf, tokens.rotations)),
       r"`tokens.rotations` must be finite, got 8 NaN or Inf values"),  # infinite, not NaN
      (tokens.replace(indices=tokens.indices[:, :-1]), rf"`tokens.indices` must have shape \[B, {k}\] .*got shape "
                                                       rf"\(8, {k - 1}\)"),
      (tokens.replace(indices=tokens.indices.astype(np.float32)), r"must be an integer array, got float32"),
      (tokens.replace(means=tokens.means[:, :-1]), rf"`tokens.means` must be a float array of shape \[8, {k}, 2\] "
                                                   rf"\(B and K as in `tokens.indices`\), got float32 of shape "
                                                   rf"\(8, {k - 1}, 2\)"),
      (tokens.replace(rotations=tokens.rotations[:4]), rf"`tokens.rotations` must be a float array of shape "
                                                       rf"\[8, {k}\].*\(4, {k}\)"),
      (tokens.replace(scales=None), r"`tokens.scales` must be a float array of shape .*got NoneType"),
      (tokens.indices, r"`tokens` must be a Tokens, got ndarray"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=r"GaussianTokenizer.decode: .*" + message):
      tokenizer.decode(bad)


def test_missing_or_foreign_checkpoints_raise_clear_errors(tmp_path, workdir, vq_workdir):
  with pytest.raises(FileNotFoundError, match=f"Checkpoint path {tmp_path / 'nowhere'} does not exist"):
    GaussianTokenizer.from_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds no checkpoints"):
    GaussianTokenizer.from_checkpoint(tmp_path / "empty")
  (tmp_path / "empty" / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match=f"No complete checkpoint in {tmp_path / 'empty' / 'checkpoints'}"):
    GaussianTokenizer.from_checkpoint(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"No complete checkpoint for step 5 .*there are \[4, 6, 8\]"):
    GaussianTokenizer.from_checkpoint(workdir, step=5)
  with pytest.raises(ValueError, match=r"from_checkpoint: `step` must be a non-negative int, got '6'"):
    GaussianTokenizer.from_checkpoint(workdir, step="6")
  # The VQ baseline's parameters saved under the GaussianToken config: named, not an Orbax traceback.
  _, _, vq_state = vq_workdir
  with checkpointing.Checkpointer(tmp_path / "foreign") as ckpt:
    ckpt.save(0, vq_state, config=load_demo_config("runlocal"))
  with pytest.raises(ValueError, match=r"another model config\?\): \['ema_params'\]\['decoder'\]"):
    GaussianTokenizer.from_checkpoint(tmp_path / "foreign")


def test_a_mesh_of_the_callers_choice(workdir, tokenizer, images):
  devices = jax.devices()[6:8]
  two = GaussianTokenizer.from_checkpoint(workdir, mesh=sharding.make_mesh(dict(data=2, fsdp=1), devices))
  assert {d for leaf in jax.tree.leaves(two.variables) for d in leaf.devices()} == set(devices)
  tokens = two.encode(images)
  assert tokens.indices.devices() == set(devices)
  np.testing.assert_array_equal(np.asarray(tokens.indices), np.asarray(tokenizer.encode(images).indices))
  with pytest.raises(ValueError, match="`mesh` must be a jax.sharding.Mesh or None, got list"):
    GaussianTokenizer.from_checkpoint(workdir, mesh=devices)
  explicit = jax.make_mesh((2, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                           devices=devices)  # JAX 0.10's default axis type
  with pytest.raises(ValueError, match="`mesh` must have Auto axes"):
    GaussianTokenizer.from_checkpoint(workdir, mesh=explicit)


def write_image_folder(folder, images):
  """PNGs in two subfolders (ids are relative paths, sorted) plus one file that does not decode."""
  for i, image in enumerate(images):
    path = folder / ("b" if i % 2 else "a") / f"img_{i:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
  (folder / "a" / "broken.png").write_bytes(b"not a png")
  return folder


def test_fitting_arguments_are_checked_before_an_export_writes_anything(workdir, vq_workdir, tokenizer, images,
                                                                         tmp_path):
  tokenizer.check_fit(np.int64(3), np.float32(0.02))  # NumPy scalars are integers and reals too
  default = tokenizer.encode(images)
  assert_tokens_equal(jax.device_get(tokenizer.encode(images, fit_geometry_steps=np.int64(0))), jax.device_get(default))
  for steps in (True, -1, 2.0):
    with pytest.raises(ValueError, match=rf"`fit_geometry_steps` must be a non-negative int, got {steps!r}"):
      tokenizer.check_fit(steps)
  for rate in (np.float32(0.0), float("inf"), float("nan")):
    with pytest.raises(ValueError, match=rf"`fit_learning_rate` must be a positive finite float, got "
                                          rf"{re.escape(repr(rate))}"):
      tokenizer.check_fit(1, rate)
  # Refused before the export's manifest is written, so that a corrected rerun is not held to the bad value.
  folder = write_image_folder(tmp_path / "images", images)
  for run, steps, message in ((vq_workdir[0], 5, "plain-VQ baseline's tokens have no geometry"),
                              (workdir, -1, "must be a non-negative int, got -1")):
    output = tmp_path / f"tokens_{steps}.npz"
    with pytest.raises(ValueError, match=message):
      tokenize.export(run, str(folder), output, fit_geometry_steps=steps)
    assert not tokenize.parts_dir(output).exists()
  with pytest.raises(ValueError, match=rf"`output` {tmp_path / 'images'} is a directory"):
    tokenize.export(workdir, str(folder), tmp_path / "images")
  assert not tokenize.parts_dir(tmp_path / "images").exists()
  with pytest.raises(FileNotFoundError, match=r"a prepared TFDS dataset is written 'tfds:NAME', e.g. 'tfds:cifar10'"):
    tokenize.make_source("cifar10")


def test_tokenize_exports_every_image_once_and_resumes(workdir, tokenizer, images, tmp_path, capsys):
  photos = np.concatenate([images, images[:3, ::-1]])  # 11 images of the trained size (the crop keeps them)
  folder = write_image_folder(tmp_path / "images", photos)
  (folder / "b" / "zz_broken.jpg").write_bytes(b"")  # unreadable files in the first batch and in the last
  expected_ids = sorted(f"{'b' if i % 2 else 'a'}/img_{i:02d}.png" for i in range(len(photos)))
  order = [int(name[-6:-4]) for name in expected_ids]

  whole = tokenize.export(workdir, str(folder), tmp_path / "whole.npz", batch_size=8)
  assert whole == {"num_images": 11, "num_skipped": 2, "batches_encoded": 2, "batches_reused": 0, "complete": True}
  ids, tokens = tokenize.load_export(tmp_path / "whole.npz")
  assert list(ids) == expected_ids
  assert list(np.load(tmp_path / "whole.npz")["skipped"]) == ["a/broken.png", "b/zz_broken.jpg"]
  assert not tokenize.parts_dir(tmp_path / "whole.npz").exists()
  direct = tokenizer.encode(photos[order[:8]])  # the first batch as the tokenizer encodes it
  np.testing.assert_array_equal(tokens.indices[:8], np.asarray(direct.indices))
  for name in ("means", "rotations", "scales"):
    np.testing.assert_allclose(getattr(tokens, name)[:8], np.asarray(getattr(direct, name)), atol=1e-5)
  assert tokens.indices.shape == (11, tokenizer.num_tokens) and tokens.scales.shape == (11, tokenizer.num_tokens, 2)

  # Interrupted after one batch, then resumed: only the missing batch is encoded; the result is identical.
  partial = tokenize.export(workdir, str(folder), tmp_path / "resumed.npz", batch_size=8, stop_after_batches=1)
  assert partial["batches_encoded"] == 1 and not partial["complete"] and not (tmp_path / "resumed.npz").exists()
  with pytest.raises(ValueError, match=r"interrupted export made with other arguments \(batch_size: before 8, "
                     r"now 4\)"):
    tokenize.export(workdir, str(folder), tmp_path / "resumed.npz", batch_size=4)
  # The parts hold one step's EMA or raw parameters' tokens, fitted or not: a rerun that changes any of these must
  # not mix its tokens with theirs. All three in one rerun (a restore costs seconds); the error names each.
  with pytest.raises(ValueError, match=r"interrupted export made with other arguments") as error:
    tokenize.export(workdir, str(folder), tmp_path / "resumed.npz", batch_size=8, use_ema=False,
                    fit_geometry_steps=1, step=TOTAL - EVERY)
  for named in ("use_ema: before True, now False", "fit_geometry_steps: before 0, now 1",
                f"step: before {TOTAL}, now {TOTAL - EVERY}"):
    assert named in str(error.value), named
  # As many files, but not the same ones: the parts on disk belong to the old ones.
  (folder / "a" / "img_00.png").rename(folder / "a" / "img_00_renamed.png")
  with pytest.raises(ValueError, match=r"interrupted export made with other arguments \(files_sha256: before "):
    tokenize.export(workdir, str(folder), tmp_path / "resumed.npz", batch_size=8)
  (folder / "a" / "img_00_renamed.png").rename(folder / "a" / "img_00.png")
  # The same checkpoint and folder named another way: its step directory, a trailing slash.
  step_dir = pathlib.Path(workdir) / "checkpoints" / str(tokenizer.step)
  resumed = tokenize.export(step_dir, f"{folder}/", tmp_path / "resumed.npz", batch_size=8)
  assert resumed["batches_encoded"] == 1 and resumed["batches_reused"] == 1 and resumed["num_images"] == 11
  a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(a.files) == sorted(b.files) == ["ids", "indices", "means", "rotations", "scales", "skipped"]
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)

  # Read back batch by batch through grain: in order, every row once.
  batches = list(tokenize.token_dataset(tmp_path / "whole.npz", 4))
  assert [len(batch_ids) for batch_ids, _ in batches] == [4, 4, 3]
  dropped = tokenize.token_dataset(tmp_path / "whole.npz", 4, drop_remainder=True)
  assert [list(batch_ids) for batch_ids, _ in dropped] == [expected_ids[:4], expected_ids[4:8]]
  assert [i for batch_ids, _ in batches for i in batch_ids] == expected_ids
  for name in ("indices", "means", "rotations", "scales"):
    np.testing.assert_array_equal(np.concatenate([getattr(t, name) for _, t in batches]), a[name], err_msg=name)
  shuffled = [i for batch_ids, _ in tokenize.token_dataset(tmp_path / "whole.npz", 4, shuffle_seed=0) for i in batch_ids]
  assert sorted(shuffled) == expected_ids and shuffled != expected_ids

  # ArrayRecord: one record per image, the same rows; read back whole or through grain.
  records = tokenize.export(workdir, str(folder), tmp_path / "tokens.array_record", batch_size=8)
  assert records["num_images"] == 11 and records["num_skipped"] == 2
  record_ids, record_tokens = tokenize.load_export(tmp_path / "tokens.array_record")
  assert list(record_ids) == expected_ids
  assert_tokens_equal(record_tokens, Tokens(**{name: a[name] for name in ("indices", "means", "rotations", "scales")}))
  from_grain = list(tokenize.token_dataset(tmp_path / "tokens.array_record", 8))
  assert [list(batch_ids) for batch_ids, _ in from_grain] == [expected_ids[:8], expected_ids[8:]]
  np.testing.assert_array_equal(from_grain[1][1].scales, a["scales"][8:])

  # The command line, in its own process: the same file, and the summary as the last line.
  command = [sys.executable, "-m", "gaussiantoken_jax.tokenize", f"--workdir={workdir}", f"--data={folder}",
             f"--output={tmp_path / 'command.npz'}", "--batch_size=8"]
  result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["num_images"] == 11
  c = np.load(tmp_path / "command.npz")
  for name in a.files:
    np.testing.assert_array_equal(a[name], c[name], err_msg=name)


TFDS_NAME = "gaussiantoken_test_images"  # its test split: 5 flat-colour PNGs, one of them not decodable


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  GaussiantokenTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_tokenize_a_prepared_tfds_split(workdir, tokenizer, tfds_dir, tmp_path):
  summary = tokenize.export(workdir, f"tfds:{TFDS_NAME}", tmp_path / "tfds.npz", split="test", tfds_data_dir=tfds_dir,
                            batch_size=4)
  assert summary == {"num_images": 4, "num_skipped": 1, "batches_encoded": 2, "batches_reused": 0, "complete": True}
  # What the records hold, read here with TFDS and PIL (ArrayRecord keeps TFDS's shuffled record order).
  records = tfds.builder(TFDS_NAME, data_dir=tfds_dir).as_data_source(
      "test", decoders={"image": tfds.decode.SkipDecoding()})
  readable, broken = {}, []
  for index in range(len(records)):
    try:
      readable[f"{TFDS_NAME}/test[{index}]"] = np.asarray(Image.open(io.BytesIO(records[index]["image"])))
    except OSError:
      broken.append(f"{TFDS_NAME}/test[{index}]")
  assert len(readable) == 4 and len(broken) == 1
  ids, tokens = tokenize.load_export(tmp_path / "tfds.npz")
  assert list(ids) == list(readable)  # the pipeline's keys, name/split[index], in the records' order
  assert list(np.load(tmp_path / "tfds.npz")["skipped"]) == broken
  config = tokenizer.config
  crop = data.pipeline.EvalCrop(config.data.image_size, config.data.eval_crop)
  direct = tokenizer.encode(np.stack([crop(image) for image in readable.values()]))
  np.testing.assert_array_equal(tokens.indices, np.asarray(direct.indices))
  for name in ("means", "rotations", "scales"):
    np.testing.assert_allclose(getattr(tokens, name), np.asarray(getattr(direct, name)), atol=1e-5, err_msg=name)

  # An interrupted export of one split is not resumed with another of as many records: its parts hold other images.
  # (The restores are this module's tokenizer: the manifest is what is checked, and each restore costs a second.)
  args = dict(tfds_data_dir=tfds_dir, batch_size=4)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(GaussianTokenizer, "from_checkpoint", classmethod(lambda cls, *_, **__: tokenizer))
    tokenize.export(workdir, f"tfds:{TFDS_NAME}", tmp_path / "split.npz", split="test", stop_after_batches=0, **args)
    with pytest.raises(ValueError, match=r"other arguments \(split: before 'test', now 'train\[:5\]'\)"):
      tokenize.export(workdir, f"tfds:{TFDS_NAME}", tmp_path / "split.npz", split="train[:5]", **args)

  with pytest.raises(FileNotFoundError, match=f"TFDS dataset '{TFDS_NAME}' is not prepared in '{tmp_path}"):
    tokenize.export(workdir, f"tfds:{TFDS_NAME}", tmp_path / "none.npz", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="`data` 'tfds:' names no TFDS dataset"):
    tokenize.export(workdir, "tfds:", tmp_path / "none.npz")
  with pytest.raises(ValueError, match=r"`split` and `tfds_data_dir` are for TFDS data .*got split='test'"):
    tokenize.export(workdir, str(tmp_path), tmp_path / "none.npz", split="test")
  assert not tokenize.parts_dir(tmp_path / "none.npz").exists()


def test_tokenize_on_two_processes_equals_one_process(workdir, tfds_dir, tmp_path):
  """The command line as two jax.distributed processes (4 CPU devices each) resumes an interrupted one-process
  export of 3 batches: process 0 encodes batch 3, process 1 batch 2; the output equals the one-process export."""
  data_arg, args = f"tfds:{TFDS_NAME}", dict(split="test", tfds_data_dir=tfds_dir, batch_size=2)
  one = tokenize.export(workdir, data_arg, tmp_path / "one.npz", **args)
  assert one["complete"] and one["batches_encoded"] == 3
  output = tmp_path / "two.npz"
  partial = tokenize.export(workdir, data_arg, output, stop_after_batches=1, **args)
  assert partial["batches_encoded"] == 1 and not partial["complete"]

  codes, outputs = run_processes(2, lambda i: [
      sys.executable, "-m", "gaussiantoken_jax.tokenize", f"--workdir={workdir}", f"--data={data_arg}",
      "--split=test", f"--tfds_data_dir={tfds_dir}", f"--output={output}", "--batch_size=2"], tmp_path, "tokenize")
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  summaries = [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in outputs]
  assert summaries == [
      {"num_images": 4, "num_skipped": 1, "batches_encoded": 1, "batches_reused": 1, "complete": True},
      {"num_images": None, "num_skipped": None, "batches_encoded": 1, "batches_reused": 0, "complete": True}]
  assert "Batch 3/3 done" in outputs[0] and "Batch 2/3 done" in outputs[1]
  assert not tokenize.parts_dir(output).exists()
  a, b = np.load(tmp_path / "one.npz"), np.load(output)
  assert sorted(a.files) == sorted(b.files) == ["ids", "indices", "means", "rotations", "scales", "skipped"]
  for name in a.files:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)
