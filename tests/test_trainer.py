"""The training loop end to end, through the real command line on an 8-device CPU mesh (demo, runlocal size):
training and checkpoints, SIGTERM and SIGKILL on the way to an exact resume, a resume refused for another
batch, seed or model, and a NaN stop.

The runs the tests signal are subprocesses (`python -m gaussiantoken_jax.main`); the others call the same loop
in-process, which spares a process start (imports and device set-up). All share JAX's persistent compilation
cache, so only the first one compiles. Run A, which the other runs are compared with, is the session's shared
`:runlocal` run, which the tokenizer tests restore too.
"""
import functools
import json
import logging
import math
import pathlib
import re
import shutil
import signal
import time

import chex
import jax
import ml_collections
import numpy as np
import pytest

from PIL import Image
from skimage import metrics as skimage_metrics

from gaussiantoken_jax import config_lib, data, losses, models, pixels, weights
from gaussiantoken_jax import restore as restore_lib
from gaussiantoken_jax.evaluation import evaluator as evaluator_lib
from gaussiantoken_jax.evaluation import inception, pictures
from gaussiantoken_jax.train import checkpointing, sharding, trainer
from gaussiantoken_jax.train import step as step_lib
from runs import (SHARED_EVERY as EVERY, SHARED_FIT_STEPS, SHARED_STEPS as TOTAL, finish, load_demo_config,
                  read_metrics, start_run, wait_for)


@functools.cache
def abstract_state():
  config = load_demo_config("runlocal")
  return step_lib.make_steps(config, sharding.make_mesh(config.mesh)).abstract_state


def restore(workdir, step=None):
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    restored = ckpt.restore(abstract_state(), step=step)
    return restored.step, jax.device_get(restored.state)


def test_interval_metrics_average_the_steps_but_keep_the_last_learning_rates_and_scale_max():
  per_step = [{"loss": np.float32(v), "learning_rate": np.float32(v / 10), "disc_learning_rate": np.float32(v / 100),
               "scale_max": np.float32(4 - v)} for v in (1.0, 2.0, 6.0)]
  assert trainer._interval_metrics(per_step) == pytest.approx(
      {"loss": 3.0, "learning_rate": 0.6, "disc_learning_rate": 0.06, "scale_max": -2.0})


def test_check_finite_names_the_first_bad_step():
  finite = {"loss": np.float32(1), "disc_loss": np.float32(1), "grad_norm": np.float32(2),
            "disc_grad_norm": np.float32(3)}
  per_step = [(5, finite), (6, {**finite, "disc_loss": np.float32(np.inf)}),
              (7, {name: np.float32(np.nan) for name in finite})]
  trainer._check_finite(per_step[:1], lambda: 4)
  with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step 6: \{'disc_loss': inf\}. "
                     r"Training stopped; the newest checkpoint, step 4, is the last good state"):
    trainer._check_finite(per_step, lambda: 4)
  with pytest.raises(FloatingPointError, match="no checkpoint was saved yet, so a rerun starts afresh"):
    trainer._check_finite(per_step, lambda: None)
  # The losses are those of the parameters before a step: with a finite loss and a non-finite gradient that
  # step's update, and so the checkpoint saved after it, would be NaN.
  for name in ("grad_norm", "disc_grad_norm"):
    with pytest.raises(FloatingPointError, match=f"at step 6: {{'{name}': nan}}"):
      trainer._check_finite([per_step[0], (6, {**finite, name: np.float32(np.nan)})], lambda: 4)


@pytest.fixture(name="run_a")
def fixture_run_a(runlocal_run):
  """Run A: the session's shared `:runlocal` run (tests/runs.py), TOTAL = 8 steps, checkpoints every EVERY = 2."""
  return runlocal_run


def test_end_to_end_training_writes_metrics_pictures_and_checkpoints(run_a):
  workdir, returncode = run_a
  assert returncode == 0, (workdir / "log.txt").read_text()[-3000:]
  records = read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  assert all(math.isfinite(r[key]) for r in train for key in ("loss", "disc_loss", "grad_norm", "l1", "lpips"))
  assert any("steps_per_sec" in r and "eta_seconds" in r for r in records)
  evals = [r for r in records if "eval_psnr" in r]
  assert [r["step"] for r in evals] == [TOTAL] and math.isfinite(evals[0]["eval_psnr"])
  assert evals[0]["eval_num_images"] == 16  # runlocal num_eval_images
  assert list((workdir / "images").glob("eval_reconstructions_*.png"))
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    assert ckpt.all_steps() == [4, 6, 8]  # keep_checkpoints = 3
    assert ckpt.restore_config()["total_steps"] == TOTAL
  step, state = restore(workdir)
  assert step == int(state.step) == TOTAL
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))


def test_restore_model_takes_the_raw_or_ema_weights_of_the_step_directory_given(run_a):
  """`restore.restore_model` on one of run A's step directories: that step's raw parameters with use_ema=False
  (its EMA ones by default, as the tokenizer tests check), and a `step` contradicting the directory is refused."""
  workdir, _ = run_a
  step_dir = workdir / "checkpoints" / str(TOTAL - EVERY)
  _, state = restore(workdir, TOTAL - EVERY)
  # Onto the mesh given (one device here; the tokenizer tests restore onto the run's own 8-device mesh).
  one_device = sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1])
  raw = restore_lib.restore_model(step_dir, use_ema=False, mesh=one_device)
  assert (raw.step, raw.use_ema) == (TOTAL - EVERY, False)
  chex.assert_trees_all_equal(jax.device_get(raw.params), state.params)
  assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves((raw.params, raw.model_state)))
  # A run whose mesh does not fit the devices here (fsdp=16 on 8) restores with the batch over all of them and the
  # weights replicated on each: the same values.
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    config = ml_collections.ConfigDict(ckpt.restore_config(TOTAL - EVERY))
  config.mesh.fsdp = 16
  ema = restore_lib.restore_model(step_dir, config=config)
  chex.assert_trees_all_equal(jax.device_get(ema.params), state.ema_params)
  assert dict(ema.steps.mesh.shape) == {"data": 8, "fsdp": 1}
  assert all(leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(jax.devices())
             for leaf in jax.tree.leaves(ema.params))
  assert restore_lib.locate_checkpoint(step_dir) == (workdir, TOTAL - EVERY)
  with pytest.raises(ValueError, match=f"`step`={TOTAL} contradicts the step directory"):
    restore_lib.locate_checkpoint(step_dir, TOTAL)


def first_eval_images(config, count):
  """The first `count` images of the eval split, in evaluation order (single process)."""
  batches = iter(data.make_eval_loader(config))
  images = []
  while sum(map(len, images)) < count:
    batch = next(batches)
    images.append(batch["image"][batch["mask"]])
  return np.concatenate(images)[:count]


def test_in_training_evaluation_is_the_evaluate_pass_with_its_pictures(run_a):
  """Run A's evaluation at its last step against skimage on the same 16 images and their reconstructions by
  the checkpoint's EMA weights, computed here; no rFID at runlocal size; every picture written."""
  workdir, returncode = run_a
  assert returncode == 0
  evals = [r for r in read_metrics(workdir) if "eval_psnr" in r]
  assert [r["step"] for r in evals] == [TOTAL]
  record = evals[0]
  assert record["eval_num_images"] == 16 and "eval_rfid" not in record and "eval_kid" not in record
  log = (workdir / "log.txt").read_text()
  assert log.count("In-training evaluation over 16 images: no rFID / KID") == 1

  config = load_demo_config("runlocal")
  _, state = restore(workdir, TOTAL)
  images = first_eval_images(config, 16)
  apply = jax.jit(lambda params, model_state, x: models.build_model(config).apply(
      {"params": params, **model_state}, x, train=False))
  out = apply(state.ema_params, state.model_state, pixels.to_model_input(images))
  real = images / 255.0
  recon = (np.clip(np.asarray(out.reconstruction, np.float64), -1, 1) + 1) / 2
  truncated = (recon * 255.0).astype(np.uint8) / 255.0
  psnrs = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(real, recon)]
  ssims = [skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1)
           for a, b in zip(real, truncated)]
  assert record["eval_psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
  # 16 images: one group of the reference's batch pooling, i.e. skimage's PSNR of the whole stack.
  assert record["eval_psnr_uint8"] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(real, truncated), abs=1e-3)
  assert record["eval_ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
  indices = np.asarray(out.indices)
  assert record["eval_codebook_usage"] == pytest.approx(np.unique(indices).size / config.model.codebook_size)

  def picture(name):
    return np.asarray(Image.open(workdir / "images" / f"eval_{name}_{TOTAL:08d}.png").convert("RGB"))

  grid = picture("reconstructions")
  np.testing.assert_array_equal(grid[:128, :128], pictures.upscale(images[:1], 4)[0])
  # Below it, its reconstruction (drawn from the metrics program's outputs): the same to one uint8 level, the
  # evaluation's 8-device program and this one summing in another order.
  shown = grid[128 + 2:2 * 128 + 2, :128].astype(int)
  assert np.abs(shown - pictures.upscale(pixels.to_uint8(np.asarray(out.reconstruction[:1])), 4)[0]).max() <= 1
  gaussians = picture("gaussians")
  assert gaussians.shape == (128, 8 * 128 + 7 * 2, 3)
  # Ellipses drawn over the first image in the colours of its codes.
  first = gaussians[:, :128].reshape(-1, 3)
  drawn = {pictures.code_colour(i) for i in np.unique(indices[0])}
  assert sum(tuple(pixel) in drawn for pixel in first) > 100
  assert picture("codebook_usage").shape == (320, 640, 3)


def test_fit_geometry_steps_are_checked_where_they_enter():
  config = load_demo_config("runlocal")
  config.eval_fit_geometry_steps = -2
  with pytest.raises(ValueError, match=r"config: `eval_fit_geometry_steps` must be a non-negative int, got -2"):
    trainer._check_loop_config(config)  # pylint: disable=protected-access
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  with pytest.raises(ValueError, match=r"Evaluator: `fit_geometry_steps` must be a non-negative int, got -2"):
    evaluator_lib.Evaluator(steps, None, fit_geometry_steps=-2)
  vq_config = load_demo_config("runlocal,baseline=vq")
  vq_steps = step_lib.make_steps(vq_config, sharding.make_mesh(vq_config.mesh))
  with pytest.raises(ValueError, match=r"Evaluator: `fit_geometry_steps`=5 needs a GaussianToken model, got "
                                       r"model.type='vq'"):
    evaluator_lib.Evaluator(vq_steps, None, fit_geometry_steps=5)


def test_the_last_evaluation_runs_again_with_the_geometry_fitted(run_a):
  """Run A asks for `eval_fit_geometry_steps`: its last evaluation is repeated with each image's geometry fitted
  (the fit itself is checked in tests/test_geometry_fit.py and against the tokenizer in tests/test_tokenizer.py)."""
  workdir, _ = run_a
  records = read_metrics(workdir)
  fitted = [r for r in records if "eval_fitted_psnr" in r]
  assert [r["step"] for r in fitted] == [TOTAL]
  plain = [r for r in records if "eval_psnr" in r][-1]
  assert fitted[0]["eval_fitted_num_images"] == plain["eval_num_images"] == 16
  # Fitting lowers every image's L1 (tests/test_tokenizer.py); measured here: 13.17 -> 13.38 dB.
  assert fitted[0]["eval_fitted_psnr"] > plain["eval_psnr"] + 0.05
  assert fitted[0]["eval_fitted_codebook_usage"] == plain["eval_codebook_usage"]  # the same codes
  log = (workdir / "log.txt").read_text()
  assert f"Eval at step {TOTAL} with the geometry fitted to each image ({SHARED_FIT_STEPS} steps): PSNR" in log
  written = sorted(p.name for p in (workdir / "images").glob("eval_fitted_*"))
  assert written == [f"eval_fitted_gaussians_{TOTAL:08d}.png", f"eval_fitted_reconstructions_{TOTAL:08d}.png"]


def test_the_run_ends_with_its_last_figures_and_where_its_pictures_are(run_a):
  """The log's closing lines restate the last evaluation (both passes) beside the block-mean baseline and name
  the reconstruction pictures, which exist."""
  workdir, _ = run_a
  records = read_metrics(workdir)
  plain = [r for r in records if "eval_psnr" in r][-1]
  fitted = [r for r in records if "eval_fitted_psnr" in r][-1]
  log = (workdir / "log.txt").read_text()
  assert log.count(f"Finished {TOTAL:,} steps in ") == 1
  summary = log[log.index(f"Finished {TOTAL:,} steps in "):]
  assert (f"images with the EMA weights: PSNR {plain['eval_psnr']:.2f} dB against "
          f"{plain['eval_psnr_block_baseline']:.2f} dB for 4x4 block means, SSIM {plain['eval_ssim']:.3f}, "
          f"LPIPS {plain['eval_lpips']:.3f}.") in summary  # runlocal: K = 16 tokens
  assert (f"fitted to it ({SHARED_FIT_STEPS} steps): PSNR {fitted['eval_fitted_psnr']:.2f} dB, "
          f"SSIM {fitted['eval_fitted_ssim']:.3f}") in summary
  pictures_named = re.findall(r"Originals above their reconstructions[a-z ]*: (\S+)", summary)
  assert pictures_named == [str(workdir / "images" / f"eval_{prefix}reconstructions_{TOTAL:08d}.png")
                            for prefix in ("", "fitted_")]
  assert all(pathlib.Path(p).is_file() for p in pictures_named)


def test_in_training_rfid_needs_eval_fid_min_images_and_the_weights(caplog):
  config = load_demo_config("runlocal")
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  calls = []

  def load(path):
    calls.append(path)
    return {"w": np.zeros(1, np.float32)}

  def unavailable(path):
    raise weights.WeightsUnavailableError("no index")

  config.eval_fid_min_images = 16
  with caplog.at_level(logging.INFO):
    assert not trainer.make_evaluator(config, steps, {}, 15, load_inception=load).computes_fid
    assert not calls and "no rFID / KID, which need at least config.eval_fid_min_images=16" in caplog.text
    assert trainer.make_evaluator(config, steps, {}, 16, load_inception=load).computes_fid
    assert calls == [None]
    assert not trainer.make_evaluator(config, steps, {}, 16, load_inception=unavailable).computes_fid
    assert "the FID Inception weights are unavailable (no index)" in caplog.text

  class Loader:
    num_records = 321
  assert trainer.eval_image_count(config, Loader()) == 16  # runlocal: num_eval_images 16
  config.num_eval_images = 1000  # more than the split has: the split (what decides on rFID is what is evaluated)
  assert trainer.eval_image_count(config, Loader()) == 321
  config.num_eval_images = 0
  assert trainer.eval_image_count(config, Loader()) == 321
  # The demo (64 images) stays without Inception; the CIFAR defaults (10k test images) compute rFID.
  demo = load_demo_config("")
  assert demo.num_eval_images < demo.eval_fid_min_images == 2048 <= config_lib.base_config().num_eval_images


def test_in_training_rfid_with_random_inception_weights():
  """The training loop's evaluation pass with rFID (threshold lowered to 8 images, random Inception weights)."""
  config = load_demo_config("runlocal")
  config.eval_fid_min_images = 8
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  lpips_params = losses.load_lpips_params(config.loss.lpips_weights_path)
  evaluator = trainer.make_evaluator(config, steps, lpips_params, 8,
                                     load_inception=lambda path: inception.init_params(0))
  start = time.monotonic()
  results, _ = trainer.evaluate(evaluator, steps.init(), data.make_eval_loader(config), 8)
  print(f"evaluation with Inception: {time.monotonic() - start:.1f} s")
  assert results["num_images"] == 8
  assert math.isfinite(results["rfid"]) and results["rfid"] > 0 and math.isfinite(results["kid"])


def test_sigterm_then_sigkill_then_exact_resume(run_a, tmp_path, caplog):
  """Run B trains run A's 8 steps but is stopped twice on the way: SIGTERM while it compiles its train step (it
  saves at its first step and exits 0, with no checkpoint before that one), then SIGKILL right after a checkpoint.
  Each restart continues from the newest checkpoint, and B's final state equals A's bit for bit. How often B logs
  and checkpoints does not enter the state."""
  workdir_a, returncode = run_a
  assert returncode == 0
  workdir = tmp_path / "run_b"
  log_path = tmp_path / "log.txt"
  args = (f"--config.total_steps={TOTAL}", f"--config.checkpoint_every_steps={EVERY}",
          f"--config.log_every_steps={EVERY}")
  # SIGTERM: no regular log or checkpoint (one process checks for the signal at every step).
  process, log = start_run(workdir, *args, "--config.log_every_steps=1000", "--config.checkpoint_every_steps=1000",
                           log_path=log_path)
  try:
    # Before the loop: the signal must not be lost while the run restores and compiles.
    wait_for(lambda: "Initialised a new run" in log_path.read_text(), process, what="the initialisation")
    process.send_signal(signal.SIGTERM)
  finally:
    returncode = finish((process, log))
  assert returncode == 0, log_path.read_text()[-3000:]
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    saved = ckpt.all_steps()
  assert len(saved) == 1 and 1 <= saved[0] < TOTAL - EVERY, saved
  # The stop logs the steps since the last log (none had been), and nothing was trained after the checkpoint.
  records = read_metrics(workdir)
  assert {r["step"] for r in records} == set(saved) and any("loss" in r for r in records), records
  # SIGKILL as soon as the resumed run has written its next checkpoint.
  next_checkpoint = (saved[0] // EVERY + 1) * EVERY
  process, log = start_run(workdir, *args, log_path=log_path)
  try:
    wait_for(lambda: checkpointing.is_complete_step(workdir / "checkpoints" / str(next_checkpoint)), process,
             what=f"checkpoint {next_checkpoint}")
    process.send_signal(signal.SIGKILL)
  finally:
    finish((process, log))
  assert process.returncode == -signal.SIGKILL
  # The last restart runs in-process (a subprocess start less): the same loop `main` calls.
  config = load_demo_config("runlocal")
  config.update(dict(total_steps=TOTAL, checkpoint_every_steps=EVERY, log_every_steps=EVERY, eval_every_steps=1000))
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(workdir))
  resumed = [int(s) for s in re.findall(r"Resumed from the checkpoint of step (\d+)",
                                        log_path.read_text() + caplog.text)]
  assert len(resumed) == 2 and resumed[0] == saved[0] and next_checkpoint <= resumed[1] < TOTAL, resumed
  assert f"Finished {TOTAL:,} steps, the last {TOTAL - resumed[1]} in " in caplog.text
  logged = [r["step"] for r in read_metrics(workdir)]
  assert logged == sorted(logged)  # each resume dropped what the stopped run had logged past its checkpoint
  chex.assert_trees_all_equal(restore(workdir_a)[1], restore(workdir)[1])


def test_a_run_stopped_before_its_final_evaluation_resumes_into_it(run_a, tmp_path, caplog):
  """In-process, on a copy of run A stopped between the two passes of its last evaluation (its checkpoints and its
  metrics without the fitted pass): the restart trains nothing and runs the missing pass only; a second restart
  finds the evaluation logged and does nothing."""
  workdir_a, returncode = run_a
  assert returncode == 0
  shutil.copytree(workdir_a / "checkpoints", tmp_path / "checkpoints")
  records_a = read_metrics(workdir_a)
  lines = (workdir_a / "metrics.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "metrics.jsonl").write_text("".join(line for line in lines if "eval_fitted_psnr" not in line))
  config = load_demo_config("runlocal")
  config.update(dict(total_steps=TOTAL, checkpoint_every_steps=EVERY, log_every_steps=EVERY, eval_every_steps=1000,
                     eval_fit_geometry_steps=SHARED_FIT_STEPS))
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert f"The checkpoint of the last step, {TOTAL}, has no final evaluation" in caplog.text
  assert "Train step compiled." not in caplog.text
  assert f"Evaluated the checkpoint of the last step, {TOTAL}, in " in caplog.text and "Finished" not in caplog.text
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if "eval_psnr" in r].count(TOTAL) == 1  # the first pass was not run again
  for key in ("eval_psnr", "eval_fitted_psnr"):  # the same state and images: the figures of run A
    expected = [r[key] for r in records_a if key in r][-1]
    assert [r["step"] for r in records if key in r][-1] == TOTAL
    assert [r[key] for r in records if key in r][-1] == pytest.approx(expected, rel=1e-5), key
  assert "Resuming with settings changed" not in caplog.text  # the run's own settings
  # Restarted with another learning rate (which a resume may change): the change is named, and nothing is done.
  config.optimizer.learning_rate = 5e-4
  caplog.clear()
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert ("Resuming with settings changed since the checkpoint: optimizer.learning_rate: saved 0.001, now 0.0005.\n"
          in caplog.text + "\n"), caplog.text  # no word on total_steps, which stayed
  assert f"Nothing to train: the checkpoint in {tmp_path} is at step {TOTAL}" in caplog.text
  assert read_metrics(tmp_path) == records
  # A shorter run than the checkpoint's: its new length is named with what it does to the schedules.
  config.total_steps = TOTAL - 2
  caplog.clear()
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert (f"Resuming with settings changed since the checkpoint: optimizer.learning_rate: saved 0.001, now 0.0005; "
          f"total_steps: saved {TOTAL}, now {TOTAL - 2}. The learning-rate schedules are those of the new total_steps "
          "from here on.") in caplog.text, caplog.text
  assert f"Nothing to train: the checkpoint in {tmp_path} is at step {TOTAL} >= total_steps={TOTAL - 2}" in caplog.text
  assert read_metrics(tmp_path) == records
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [4, 6, 8]  # nothing was trained or saved


def test_a_run_killed_during_an_evaluation_runs_it_on_resume(run_a, tmp_path, caplog):
  """In-process, on a copy of run A cut back to its checkpoint of step 6 as if killed while evaluating step 6 (the
  checkpoint is saved first): the restart evaluates step 6 before training on, then trains to run A's final state
  and final figures."""
  workdir_a, returncode = run_a
  assert returncode == 0
  shutil.copytree(workdir_a / "checkpoints", tmp_path / "checkpoints")
  shutil.rmtree(tmp_path / "checkpoints" / str(TOTAL))
  records_a = read_metrics(workdir_a)
  (tmp_path / "metrics.jsonl").write_text("".join(
      line for line in (workdir_a / "metrics.jsonl").read_text().splitlines(keepends=True)
      if json.loads(line)["step"] <= 6))
  config = load_demo_config("runlocal")
  config.update(dict(total_steps=TOTAL, checkpoint_every_steps=EVERY, log_every_steps=EVERY, eval_every_steps=6,
                     eval_fit_geometry_steps=SHARED_FIT_STEPS))
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert "The checkpoint of step 6 has no evaluation in" in caplog.text
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if "eval_psnr" in r] == [6, TOTAL]
  # The pass with the geometry fitted is the last evaluation's only, not the one of step 6 (its cost).
  assert [r["step"] for r in records if "eval_fitted_psnr" in r] == [TOTAL]
  order = [(r["step"], "eval_psnr" in r) for r in records]
  assert order.index((6, True)) < order.index((TOTAL, False))  # evaluated before the steps after it were trained
  expected = [r["eval_psnr"] for r in records_a if "eval_psnr" in r][-1]
  assert [r["eval_psnr"] for r in records if "eval_psnr" in r][-1] == pytest.approx(expected, rel=1e-5)
  chex.assert_trees_all_equal(restore(workdir_a)[1], restore(tmp_path)[1])


def test_resuming_with_another_batch_seed_or_model_stops_naming_both_values(run_a, tmp_path, caplog):
  """In-process, on a copy of run A's checkpoints: the check comes before any state is restored or compiled."""
  workdir_a, returncode = run_a
  assert returncode == 0
  shutil.copytree(workdir_a / "checkpoints", tmp_path / "checkpoints")
  config = load_demo_config("runlocal")
  config.update(dict(total_steps=2 * TOTAL, batch_size=16, seed=3))
  config.model.num_gaussians = 4
  with caplog.at_level(logging.INFO), pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert message.startswith(f"Cannot resume from {tmp_path / 'checkpoints'}: "), message
  for named in ("batch_size: saved 8, requested 16", "seed: saved 0, requested 3",
                "model.num_gaussians: saved 16, requested 4"):
    assert named in message, message
  assert "total_steps" not in message  # a longer run is a legitimate resume
  assert ("Training for 16 steps of 16 images (set in steps) from a training split of 576 images; warm-up 5 steps "
          "(set in steps); GAN from step 5 (set in steps)." in caplog.text)
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [4, 6, 8]  # nothing was trained or saved
    assert ckpt.saved_process_count() == 1
  # The run's own config, but its data positions as two processes would have saved them.
  data_dir = tmp_path / "checkpoints" / "8" / checkpointing.DATA
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  config = load_demo_config("runlocal")
  config.update(dict(total_steps=2 * TOTAL))
  with pytest.raises(ValueError, match=r"its data positions were saved by 2 processes and this run has 1"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  """In-process: the loop raises FloatingPointError (which `main` turns into a non-zero exit like any other).
  The workdir holds the metrics of an earlier start that was killed before its first checkpoint (its last line
  cut short): a fresh start drops them."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 0.5}\n{"step": 10, "loss": 0.4}\n{"step": 1')
  config = load_demo_config("runlocal")
  # Warm-up reaches lr ~ 2e29 at the second step: the parameters blow up and the next loss is not finite.
  config.update(dict(total_steps=10, checkpoint_every_steps=1, log_every_steps=10, eval_every_steps=1000))
  config.optimizer.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step (\d+)") as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == ""  # the stop came before the first log step
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    steps = ckpt.all_steps()
  # Checkpoints every step, each step checked before its save: the step named is the first one not saved, the
  # one right after the newest checkpoint (not the step before it, nor the one after).
  assert steps and bad_step == max(steps) + 1, (steps, bad_step)
  assert f"the newest checkpoint, step {max(steps)}, is the last good state" in str(error.value)
  _, state = restore(tmp_path)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
