"""One evaluation pass of a tokenizer: every metric of the paper's Table 1 and the pictures, for the command
line and for the training loop alike.

    evaluator = Evaluator(steps, lpips_params, inception_params)    # once per run (jits the batch function)
    metrics, pictures = evaluator.evaluate(ema_params, model_state, eval_loader)

Per batch, on the device (one jitted function, sharded like the eval step): `train.step.eval_step` (per-image
PSNR on [0, 1], LPIPS-VGG, code counts, reconstructions), the reference-protocol PSNR inputs and SSIM
(`image_metrics`), and the FID Inception pool3 features of the originals and of the reconstructions. Nothing
is fetched to the host until the pass is over, except the first batch's pictures and what the progress lines
wait for; then FID and KID are computed in float64 (`evaluation.fid`).

rFID, as in the reference, is the FID between the originals of the evaluation set and their reconstructions
(reconstructions clipped to [0, 255], not quantised, as the reference feeds Inception floats:
`pixels.to_pixels`). It needs the Inception parameters; with `inception_params=None` (the training loop on a
small subset) the keys "rfid", "kid" and "kid_std" are left out. `MIN_FID_IMAGES` is the smallest evaluation
for which rFID is worth its cost: below the feature dimension (2048) the covariance is singular and FID mostly
measures its own bias.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gaussiantoken_jax import data, pixels
from gaussiantoken_jax.checks import check_non_negative_int, check_positive_int
from gaussiantoken_jax.evaluation import fid, image_metrics, inception, pictures
from gaussiantoken_jax.train import sharding
from gaussiantoken_jax.train import step as step_lib
from gaussiantoken_jax.train import writers

MIN_FID_IMAGES = inception.FEATURE_DIM
NUM_PICTURES = 8
METRIC_KEYS = ("rfid", "kid", "kid_std", "psnr", "psnr_block_baseline", "psnr_uint8", "ssim", "lpips",
               "codebook_usage", "perplexity", "num_images")


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _local_image_limit(max_images: int) -> int:
  """This process's share of `max_images` (the shares of all processes add up to it)."""
  count, index = jax.process_count(), jax.process_index()
  return max_images // count + (index < max_images % count)


class Evaluator:
  """Evaluates the EMA generator of a run on batches of uint8 images; see the module docstring.

  Args:
    steps: the run's `train.step.Steps` (model, mesh, batch sharding).
    lpips_params: LPIPS-VGG parameters (`losses.load_lpips_params()`), on the host or replicated.
    inception_params: FID Inception parameters (`inception.load_inception_params()`), or None to skip
      rFID / KID (and the cost of running Inception).
    num_pictures: images shown in the pictures (the first ones of the pass).
    fit_geometry_steps: > 0 evaluates GaussianToken with each image's geometry fitted to it at encode time
      (`geometry_fit`, as `GaussianTokenizer.encode(..., fit_geometry_steps=N)`): every metric and picture.
  """

  def __init__(self, steps: step_lib.Steps, lpips_params, inception_params=None, *,
               num_pictures: int = NUM_PICTURES, fit_geometry_steps: int = 0):
    check_positive_int("Evaluator", "num_pictures", num_pictures)
    check_non_negative_int("Evaluator", "fit_geometry_steps", fit_geometry_steps)
    if fit_geometry_steps and steps.config.model.type != "gaussiantoken":
      raise ValueError(f"Evaluator: `fit_geometry_steps`={fit_geometry_steps} needs a GaussianToken model, got "
                       f"model.type={steps.config.model.type!r} (its tokens have no geometry).")
    self._steps = steps
    self._lpips_params = steps.replicate(lpips_params)
    self._inception_params = None if inception_params is None else steps.replicate(inception_params)
    self._num_pictures = num_pictures
    with_fid = inception_params is not None

    def batch_outputs(ema_params, model_state, batch, lpips_params, inception_params):
      output = step_lib.eval_step(steps, ema_params, model_state, batch, lpips_params, fit_geometry_steps)
      x_hat = output.reconstructions
      mse_uint8, ssim = image_metrics.reference_protocol_metrics(batch["image"], x_hat)
      outputs = dict(metrics=output.metrics, counts=output.code_counts, mse_uint8=mse_uint8, ssim=ssim,
                     pictures=(x_hat, output.indices, output.gaussians))
      if with_fid:
        outputs["real"] = inception.features(inception_params, batch["image"])
        outputs["fake"] = inception.features(inception_params, pixels.to_pixels(x_hat))
      return outputs

    self._batch_outputs = jax.jit(sharding.traced_on(steps.mesh, batch_outputs),
                                  compiler_options=steps.compiler_options)

  @property
  def computes_fid(self) -> bool:
    return self._inception_params is not None

  def evaluate(self, ema_params, model_state, batches: Iterable[dict], *, num_batches: int | None = None,
               max_images: int | None = None, log_every_batches: int = 10) -> tuple[dict[str, float],
                                                                                     dict[str, np.ndarray]]:
    """One pass over `batches` (this process's {"image": uint8 [b, S, S, 3], "mask": bool [b]} numpy batches,
    e.g. `data.make_eval_loader(config)`); every process must call it with the same number of batches.

    Args:
      ema_params, model_state: the generator's EMA parameters and model state (sharded as in training).
      batches: local batches; padding images have mask False.
      num_batches: stop after this many batches (default: all, or as many as `max_images` needs).
      max_images: evaluate at most this many images in all (split evenly over processes).
      log_every_batches: a progress line (images/s, ETA) every this many batches.

    Returns:
      (metrics, pictures): metrics {"rfid", "kid", "kid_std" (only with Inception parameters), "psnr",
      "psnr_block_baseline", "psnr_uint8", "ssim", "lpips", "codebook_usage", "perplexity", "num_images"}; pictures
      {"reconstructions", "codebook_usage", and "gaussians" for GaussianToken}: uint8 [H, W, 3] arrays.
    """
    if max_images is not None:
      check_positive_int("evaluate", "max_images", max_images)
    local_limit = None if max_images is None else _local_image_limit(max_images)
    local_batch_size = getattr(batches, "batch_size", None)  # an EvalLoader knows its size and length
    if num_batches is None and local_batch_size and hasattr(batches, "__len__"):
      num_batches = len(batches)
      if local_limit is not None:
        num_batches = min(num_batches, _ceil_div(_ceil_div(max_images, jax.process_count()), local_batch_size))
    progress = None
    if num_batches and local_batch_size:
      progress = writers.ProgressReporter(total_steps=num_batches, batch_size=local_batch_size * jax.process_count(),
                                          unit="eval batch", units="batches")
    metrics = counts = None
    per_image: dict[str, list] = {"mse_uint8": [], "ssim": [], "mask": []}
    real, fake = fid.FeatureAccumulator(), fid.FeatureAccumulator()
    shown = None
    seen = 0
    start = time.monotonic()
    for index, local_batch in enumerate(batches):
      if num_batches is not None and index >= num_batches:
        break
      if local_limit is not None:
        mask = local_batch["mask"] & (np.cumsum(local_batch["mask"]) + seen <= local_limit)
        local_batch = {**local_batch, "mask": mask}
      seen += int(np.sum(local_batch["mask"]))
      batch = data.to_global_array(local_batch, self._steps.batch_sharding)
      out = self._batch_outputs(ema_params, model_state, batch, self._lpips_params, self._inception_params)
      metrics = out["metrics"] if metrics is None else metrics.merge(out["metrics"])
      counts = out["counts"] if counts is None else counts + out["counts"]
      per_image["mse_uint8"].append(out["mse_uint8"])
      per_image["ssim"].append(out["ssim"])
      per_image["mask"].append(batch["mask"])
      if self.computes_fid:
        real.add(out["real"], batch["mask"])
        fake.add(out["fake"], batch["mask"])
      missing = self._num_pictures - (0 if shown is None else len(shown["images"]))
      if missing > 0:  # the same on every process: the pictures are gathered from all of them
        more = self._pictures_of_batch(batch, out["pictures"], missing)
        shown = more if shown is None else {name: np.concatenate([shown[name], more[name]]) for name in shown}
      if progress is not None and (index + 1) % log_every_batches == 0:
        jax.block_until_ready(out["ssim"])  # so that the rate counts finished batches, not dispatched ones
        progress.report(index + 1)
    if metrics is None:
      raise ValueError("evaluate: `batches` yielded no batch.")

    mse_uint8, ssim, masks = multihost_utils.process_allgather(
        (per_image["mse_uint8"], per_image["ssim"], per_image["mask"]), tiled=True)
    keep = [np.asarray(m, bool) for m in masks]
    mse_uint8 = np.concatenate([np.asarray(v)[k] for v, k in zip(mse_uint8, keep)])
    ssim = np.concatenate([np.asarray(v)[k] for v, k in zip(ssim, keep)])
    counts = np.asarray(jax.device_get(counts))
    usage, perplexity = step_lib.code_usage_and_perplexity(counts)
    results = {name: float(value) for name, value in metrics.compute().items()}  # psnr, lpips
    results.update(psnr_uint8=image_metrics.pooled_psnr(mse_uint8), ssim=float(np.mean(ssim)) if ssim.size else
                   math.nan, codebook_usage=usage, perplexity=perplexity, num_images=int(ssim.size))
    if self.computes_fid:
      real_features, fake_features = real.result(), fake.result()
      if real_features.shape[0] < MIN_FID_IMAGES:
        logging.warning("rFID over %d images (< %d, the feature dimension) is dominated by its small-sample bias; "
                        "compare KID instead.", real_features.shape[0], MIN_FID_IMAGES)
      scores = fid.fid_and_kid(real_features, fake_features)
      results.update(rfid=scores["fid"], kid=scores["kid"], kid_std=scores["kid_std"])
    logging.info("Evaluated %d images in %.1f s.", results["num_images"], time.monotonic() - start)
    results = {key: results[key] for key in METRIC_KEYS if key in results}
    return results, self._make_pictures(shown, counts, perplexity)

  def _pictures_of_batch(self, batch, outputs, count: int) -> dict[str, np.ndarray]:
    """Host copies of the first `count` unmasked images of a global batch, their reconstructions and Gaussians
    (`outputs`: this batch's (reconstructions, indices, gaussians) from the metrics program)."""
    images, mask, (x_hat, indices, gaussians) = multihost_utils.process_allgather(
        (batch["image"], batch["mask"], outputs), tiled=True)
    chosen = np.flatnonzero(np.asarray(mask))[:count]
    shown = {"images": np.asarray(images)[chosen], "reconstructions": pixels.to_uint8(np.asarray(x_hat)[chosen]),
             "indices": np.asarray(indices)[chosen]}
    if gaussians is not None:
      shown.update({name: np.asarray(getattr(gaussians, name))[chosen] for name in ("means", "rotations", "scales")})
    return shown

  def _make_pictures(self, shown: dict[str, np.ndarray], counts: np.ndarray, perplexity: float) -> dict[str, Any]:
    result = {"codebook_usage": pictures.codebook_usage_plot(counts, perplexity=perplexity)}
    if shown["images"].shape[0] == 0:
      return result
    result["reconstructions"] = pictures.reconstruction_grid(shown["images"], shown["reconstructions"])
    if "means" in shown:
      result["gaussians"] = pictures.gaussian_overlay(
          shown["images"], shown["means"], shown["rotations"], shown["scales"], shown["indices"],
          feature_shape=self._steps.model.feature_shape)
    return result
