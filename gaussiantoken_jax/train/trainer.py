"""The training loop: `train_and_evaluate(config, workdir)`, for `main.py` and notebooks alike.

Start-up (`train_and_evaluate`), then one function in sections (`_train`, big_vision's layout): mesh and steps
(`step.make_steps`), input, restore-or-init, then the loop. Per step: next local batch -> global array -> jitted
train step. Around it:

* Metrics: the step's dicts of scalars stay on the device until the log step, then are averaged on the host
  (`_interval_metrics`) and written with steps/s, images/s and ETA.
* NaN/Inf: checked in one place, at each log or checkpoint step, for every step since the last check (as
  big_vision does at its log steps), so the host does not wait for the device in between. A non-finite loss or
  gradient norm raises FloatingPointError before anything is written, leaving the last good checkpoint as the
  newest one: the losses are those of the parameters before a step, the gradient norms say whether its update,
  and so the state a checkpoint would save, is finite.
* Checkpoints every `checkpoint_every_steps` and at the end: the state, the config and every process's data
  iterator position. Restarting the same command on the same workdir continues exactly where the newest
  complete checkpoint left off (same batches, same random draws).
* SIGTERM: a checkpoint at the next step boundary, then a normal return (exit status 0). A run stopped on an
  evaluation step, or killed during an evaluation, resumes into the pass(es) of that evaluation missing from
  `metrics.jsonl` (at the last step, that is all it does).
* Evaluation with the EMA weights every `eval_every_steps` and at the end, over the first `num_eval_images`
  images of the eval split: the pass of `python -m gaussiantoken_jax.evaluate` (`evaluation.Evaluator`). PSNR
  beside the block-average baseline with as many cells as tokens (`eval_psnr_block_baseline`: a tokenizer must
  beat it), the reference's uint8 PSNR, SSIM, LPIPS, code usage and perplexity; rFID and KID only when the
  subset holds at least `eval_fid_min_images` images and the FID Inception weights load (`make_evaluator` logs
  why not otherwise). Pictures: originals above their reconstructions, the Gaussians (GaussianToken) and the
  sorted codebook usage, as PNG under `workdir/images/` and TensorBoard images. With
  `eval_fit_geometry_steps` > 0 (GaussianToken) the last evaluation runs a second time with each image's
  geometry fitted to it at encode time (`geometry_fit`), logged as `eval_fitted_*` with its own reconstructions
  and Gaussians.
* The end: the last evaluation's figures beside the block-mean baseline, and the paths of its pictures and
  metrics, as the run's closing log lines.

Only process 0 writes metrics and pictures (`writers.create_writer`); every process runs the same steps.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gaussiantoken_jax import config_lib, data, losses, weights
from gaussiantoken_jax.checks import check_non_negative_int
from gaussiantoken_jax.evaluation import evaluator as evaluator_lib
from gaussiantoken_jax.evaluation import inception
from gaussiantoken_jax.train import checkpointing, distributed, sharding, writers
from gaussiantoken_jax.train import step as step_lib


_FINITE_METRICS = ("loss", "disc_loss", "grad_norm", "disc_grad_norm")


def _check_finite(per_step: list[tuple[int, dict]], newest_checkpoint: Callable[[], int | None]) -> None:
  """Raises FloatingPointError at the first of these (step, metrics) whose generator or discriminator loss or
  gradient norm is NaN or Inf, naming `newest_checkpoint()`, the step a rerun resumes from."""
  values = jax.device_get([{name: m[name] for name in _FINITE_METRICS} for _, m in per_step])
  for (step, _), step_values in zip(per_step, values):
    bad = {name: float(value) for name, value in step_values.items() if not math.isfinite(float(value))}
    if bad:
      saved = newest_checkpoint()
      where = ("no checkpoint was saved yet, so a rerun starts afresh" if saved is None else
               f"the newest checkpoint, step {saved}, is the last good state and a rerun resumes from it")
      raise FloatingPointError(f"Non-finite loss or gradient at step {step}: {bad}. Training stopped; {where} "
                               "(lower the learning rate or check the data first).")


def _interval_metrics(per_step: list[dict]) -> dict[str, float]:
  """The train step's metrics over a logging interval, on the host: each one's mean over the steps, except the
  learning rates and scale_max (`step.LAST_VALUE_METRICS`): their last value."""
  per_step = jax.device_get(per_step)
  return {name: float(per_step[-1][name]) if name in step_lib.LAST_VALUE_METRICS
          else float(np.mean([metrics[name] for metrics in per_step])) for name in per_step[0]}


def eval_image_count(config: ml_collections.ConfigDict, eval_loader) -> int:
  """How many images the in-training evaluation covers: `num_eval_images` (0 = all), at most the split's size."""
  available = eval_loader.num_records
  return available if config.num_eval_images <= 0 else min(config.num_eval_images, available)


def make_evaluator(config: ml_collections.ConfigDict, steps: step_lib.Steps, lpips_params, num_images: int, *,
                   load_inception=inception.load_inception_params) -> evaluator_lib.Evaluator:
  """The in-training `Evaluator`: with the FID Inception network (rFID, KID) only when `num_images` reaches
  `config.eval_fid_min_images` and the weights (`config.eval_inception_weights`, default fetched and cached) can
  be loaded. Otherwise it logs, once, why rFID is skipped; `python -m gaussiantoken_jax.evaluate` computes it
  on a checkpoint. `load_inception(path)` returns the parameters (tests pass random ones)."""
  inception_params = None
  if num_images < config.eval_fid_min_images:
    logging.info("In-training evaluation over %d images: no rFID / KID, which need at least "
                 "config.eval_fid_min_images=%d images (below the 2048 feature dimension FID is mostly its own "
                 "small-sample bias; docs/evaluation.md). `python -m gaussiantoken_jax.evaluate` computes them on "
                 "a checkpoint.", num_images, config.eval_fid_min_images)
  else:
    try:
      inception_params = load_inception(config.eval_inception_weights)
    except weights.WeightsUnavailableError as err:
      logging.warning("In-training evaluation over %d images: no rFID / KID, the FID Inception weights are "
                      "unavailable (%s). Set config.eval_inception_weights to a local default_1.pt or .npz.",
                      num_images, err)
    else:
      logging.info("In-training evaluation over %d images, with rFID and KID.", num_images)
  return evaluator_lib.Evaluator(steps, lpips_params, inception_params)


def evaluate(evaluator: evaluator_lib.Evaluator, state: step_lib.TrainState, eval_loader,
             max_images: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """The EMA weights' metrics over the first `max_images` (None: all) images of `eval_loader`, and the pictures
  (`Evaluator.evaluate`). Every process must call it."""
  return evaluator.evaluate(state.ema_params, state.model_state, eval_loader, max_images=max_images)


def _log_summary(config: ml_collections.ConfigDict, workdir: epath.Path, passes: dict[str, dict[str, float]],
                 seconds: float, first_step: int) -> None:
  """The run's last lines: the final evaluation's figures beside the block-mean baseline, and where to look.
  `first_step`: where this process started (the total steps when it only ran the final evaluation)."""
  results = passes[""]
  step = config.total_steps
  cells = step_lib.block_baseline_cells(config)
  took = f"{writers.format_duration(seconds)} (this process, compilation included)"
  if first_step == 0:
    done = f"Finished {step:,} steps in {took}."
  elif first_step < step:
    done = f"Finished {step:,} steps, the last {step - first_step:,} in {took}."
  else:
    done = f"Evaluated the checkpoint of the last step, {step:,}, in {took}."
  lines = [f"{done} Held-out reconstructions of {results['num_images']} images with the EMA weights: PSNR "
           f"{results['psnr']:.2f} dB against {results['psnr_block_baseline']:.2f} dB for {cells}x{cells} block "
           f"means, SSIM {results['ssim']:.3f}, LPIPS {results['lpips']:.3f}."]
  if "fitted_" in passes:
    fitted = passes["fitted_"]
    lines.append(f"With each image's geometry fitted to it ({config.eval_fit_geometry_steps} steps): PSNR "
                 f"{fitted['psnr']:.2f} dB, SSIM {fitted['ssim']:.3f}, LPIPS {fitted['lpips']:.3f}.")
  for prefix, how in (("", ""), ("fitted_", " with the geometry fitted")):
    if prefix in passes:
      picture = writers.image_path(workdir, f"eval_{prefix}reconstructions", step)
      lines.append(f"Originals above their reconstructions{how}: {picture}")
  lines.append(f"All metrics: {workdir / writers.METRICS_FILE}; checkpoints: "
               f"{workdir / checkpointing.CHECKPOINT_SUBDIR}.")
  logging.info("\n".join(lines))


def _check_loop_config(config: ml_collections.ConfigDict) -> None:
  for name in ("total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints",
               "eval_fid_min_images"):
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}.")
  # Checked now: the fitted evaluation runs only at the end of training.
  check_non_negative_int("config", "eval_fit_geometry_steps", config.eval_fit_geometry_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns the final state.

  Durations stated in epochs are turned into steps first (`config_lib.resolve_steps`, logged once); the
  resolved config is the one trained and saved. Returns early, after saving a checkpoint, when the process
  receives SIGTERM. Raises FloatingPointError on a non-finite loss, and ValueError when the workdir holds a run
  with another global batch size, seed or model (`checkpointing.check_resumable`).
  """
  start_time = time.monotonic()
  config = config_lib.resolve_steps(config, data.train_split_size(config))
  _check_loop_config(config)
  checkpointing.silence_orbax_info_logs()
  distributed.initialize_from_env()
  # SIGTERM asks the loop to save and stop from here on: jax.distributed installs a handler of its own that
  # would swallow the signal while the run restores and compiles (minutes), before the loop starts.
  with checkpointing.PreemptionGuard(sync_every_steps=config.log_every_steps) as guard:
    return _train(config, workdir, guard, start_time)


def _train(config: ml_collections.ConfigDict, workdir: str, guard: checkpointing.PreemptionGuard,
           start_time: float) -> step_lib.TrainState:
  """`train_and_evaluate` after its start-up, with the preemption guard in place."""
  # --- Processes and devices.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size("config.batch_size", config.batch_size, mesh)
  if config.data.eval_batch_size:
    sharding.check_batch_size("config.data.eval_batch_size", config.data.eval_batch_size, mesh)
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  writer = writers.create_writer(workdir, is_main)
  logging.info("Process %d of %d; mesh %s over %d devices (%d local).", jax.process_index(), jax.process_count(),
               dict(mesh.shape), jax.device_count(), jax.local_device_count())

  # --- Model, optimizers, shardings and jitted steps; frozen LPIPS weights on every device.
  steps = step_lib.make_steps(config, mesh)
  lpips_params = steps.replicate(losses.load_lpips_params(config.loss.lpips_weights_path))

  # --- Input.
  train_iter = iter(data.make_train_loader(config))
  eval_loader = data.make_eval_loader(config)
  evaluator = make_evaluator(config, steps, lpips_params, eval_image_count(config, eval_loader))
  fitted_evaluator = None  # the last evaluation again, the geometry fitted to each image (no rFID: its cost)
  if config.eval_fit_geometry_steps and config.model.type == "gaussiantoken":
    fitted_evaluator = evaluator_lib.Evaluator(steps, lpips_params, fit_geometry_steps=config.eval_fit_geometry_steps)
  max_eval_images = config.num_eval_images if config.num_eval_images > 0 else None

  # --- Restore the newest checkpoint (state and data position), or start afresh.
  distributed.barrier("gaussiantoken_jax.trainer.started")  # before the Checkpointer's first collective
  # Several processes save synchronously: Orbax's background finalize synchronises the hosts while the main
  # thread runs the next steps' collectives, and with CPU (gloo) collectives that interleaving was seen to
  # deadlock a two-process run after its first checkpoint.
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                            async_save=jax.process_count() == 1)
  profiler = None  # created with the loop; the `finally` ends a capture the loop left open
  try:
    if checkpointer.latest_step() is not None:
      saved_config = checkpointer.restore_config()
      checkpointing.check_resumable(saved_config, config, where=str(checkpointer.directory))
      # Each process's data position belongs to its own shard and shuffle: another process count has none.
      saved_processes = checkpointer.saved_process_count()
      if saved_processes not in (None, jax.process_count()):
        raise ValueError(f"Cannot resume from {checkpointer.directory}: its data positions were saved by "
                         f"{saved_processes} processes and this run has {jax.process_count()}; resume with "
                         f"{saved_processes} (GAUSSIANTOKEN_NUM_PROCESSES, launch/multiprocess_local.sh), or train "
                         "in a new workdir.")
      changed = checkpointing.changed_settings(saved_config, config)
      if changed:
        logging.warning("Resuming with settings changed since the checkpoint: %s.%s", "; ".join(changed),
                        " The learning-rate schedules are those of the new total_steps from here on."
                        if any(line.startswith("total_steps:") for line in changed) else "")
      restored = checkpointer.restore(steps.abstract_state, data=data.restore_args(train_iter))
      state = restored.state
      logging.info("Resumed from the checkpoint of step %d in %s.", restored.step, checkpointer.directory)
      if is_main:
        dropped = writers.discard_metrics_after(workdir, restored.step)
        if dropped:
          logging.info("Dropped %d line(s) of %s logged after step %d: they are trained again.", dropped,
                       writers.METRICS_FILE, restored.step)
    else:
      state = steps.init()
      logging.info("Initialised a new run in %s.", workdir)
      # A run killed before its first complete checkpoint starts afresh: what it logged goes too.
      if is_main and (dropped := writers.discard_metrics_after(workdir, 0)):
        logging.info("Dropped %d line(s) of %s from an earlier start that saved no checkpoint.", dropped,
                     writers.METRICS_FILE)
    first_step = int(state.step)

    def eval_due(step: int) -> bool:
      return step % config.eval_every_steps == 0 or step == config.total_steps

    # A checkpoint is saved before its step's evaluation, so a run killed during a long evaluation (a preemption's
    # grace period is shorter than an rFID pass), or stopped on an evaluation step, resumes at a step whose
    # evaluation is missing: it runs that evaluation first. At the last step that is all there is to do. The
    # metrics file is in the workdir every process restores from, so all of them take the same branch.
    final = first_step == config.total_steps
    pending_key = "eval_fitted_psnr" if final and fitted_evaluator is not None else "eval_psnr"
    eval_pending = (first_step > 0 and eval_due(first_step)
                    and writers.logged_record(workdir, first_step, pending_key) is None)
    evaluate_only = final and eval_pending
    if first_step >= config.total_steps and not evaluate_only:
      logging.info("Nothing to train: the checkpoint in %s is at step %d >= total_steps=%d.", workdir, first_step,
                   config.total_steps)
      return state

    # --- Compile ahead of time; then all processes start the loop together (see distributed.barrier).
    # (The evaluation pass compiles at its first use.)
    if not evaluate_only:
      train_step = steps.train_step.lower(state, steps.abstract_batch(config.batch_size), lpips_params).compile()
      distributed.barrier("gaussiantoken_jax.trainer.compiled")
      logging.info("Train step compiled.")

    def save(step: int) -> None:
      checkpointer.save(step, state, config=config, data=data.checkpoint_args(train_iter))

    def run_eval(step: int, logged: dict | None = None) -> dict[str, dict[str, float]]:
      """Evaluates, writes and logs; returns {"": results} and, at the end with the fit, {"fitted_": ...}.
      `logged`: the first pass's record in metrics.jsonl, when only the fitted pass is missing."""
      if logged is None:
        results, images = evaluate(evaluator, state, eval_loader, max_eval_images)
        writer.write_scalars(step, {f"eval_{name}": value for name, value in results.items()})
        cells = step_lib.block_baseline_cells(config)
        logging.info("Eval at step %d over %d images: PSNR %.2f dB (uint8 pooled %.2f dB), SSIM %.3f%s; the "
                     "trivial answer (%dx%d block means, as many values as tokens) gets %.2f dB.", step,
                     results["num_images"], results["psnr"], results["psnr_uint8"], results["ssim"],
                     f", rFID {results['rfid']:.2f}" if "rfid" in results else "", cells, cells,
                     results["psnr_block_baseline"])
        writer.write_images(step, {f"eval_{name}": picture[None] for name, picture in images.items()})
      else:
        results = {name.removeprefix("eval_"): value for name, value in logged.items() if name.startswith("eval_")}
      passes = {"": results}
      if fitted_evaluator is not None and step == config.total_steps:
        results, images = evaluate(fitted_evaluator, state, eval_loader, max_eval_images)
        writer.write_scalars(step, {f"eval_fitted_{name}": value for name, value in results.items()})
        logging.info("Eval at step %d with the geometry fitted to each image (%d steps): PSNR %.2f dB, SSIM %.3f, "
                     "LPIPS %.3f.", step, config.eval_fit_geometry_steps, results["psnr"], results["ssim"],
                     results["lpips"])
        writer.write_images(step, {f"eval_fitted_{name}": picture[None] for name, picture in images.items()
                                   if name != "codebook_usage"})  # the same codes as the first pass
        passes["fitted_"] = results
      return passes

    final_passes = None  # the evaluation at total_steps, for the closing summary
    if eval_pending:
      if final:
        logging.info("The checkpoint of the last step, %d, has no final evaluation in %s (the run stopped before it "
                     "was written): evaluating now.", first_step, workdir / writers.METRICS_FILE)
      else:
        logging.info("The checkpoint of step %d has no evaluation in %s (the run stopped before it was written): "
                     "evaluating it before training on.", first_step, workdir / writers.METRICS_FILE)
      # Stopped between the last evaluation's two passes: the first is in metrics.jsonl already.
      passes = run_eval(first_step, logged=writers.logged_record(workdir, first_step, "eval_psnr"))
      if final:
        final_passes = passes

    # --- The loop.
    profiler = writers.create_profiler(workdir, is_main, config.profile_steps, first_step)
    progress = writers.ProgressReporter(total_steps=config.total_steps, batch_size=config.batch_size,
                                        writer=writer, first_step=first_step)
    interval, unchecked = [], []  # this interval's metrics (on device); (step, metrics) not yet checked for NaN
    step = first_step
    while step < config.total_steps:
      batch = data.to_global_array(next(train_iter), steps.batch_sharding)
      state, step_metrics = train_step(state, batch, lpips_params)
      step += 1
      if profiler is not None:
        profiler(step, step_metrics)
      interval.append(step_metrics)
      unchecked.append((step, step_metrics))
      stop = guard.should_stop(step)
      # A stop logs too: the resumed run starts after this step and would never log the steps since the last log.
      log_now = stop or step % config.log_every_steps == 0 or step == config.total_steps
      save_now = stop or step % config.checkpoint_every_steps == 0 or step == config.total_steps
      if log_now or save_now:
        _check_finite(unchecked, checkpointer.newest_step)
        unchecked = []
      if log_now:
        writer.write_scalars(step, _interval_metrics(interval))
        interval = []
        progress.report(step)
      if save_now:
        save(step)
      if stop:
        logging.warning("Stopped at step %d on a preemption signal; checkpoint saved.", step)
        break
      if eval_due(step):
        passes = run_eval(step)
        if step == config.total_steps:
          final_passes = passes
  finally:
    if profiler is not None:
      profiler.close()
    checkpointer.close()  # waits for the last save
    writer.close()
  if is_main and final_passes is not None:
    _log_summary(config, workdir, final_passes, time.monotonic() - start_time, first_step)
  return state
