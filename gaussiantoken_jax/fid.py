r"""FID and KID between two image sets, as pytorch-fid's command does it, with the real FID Inception network.

  python -m gaussiantoken_jax.fid PATH_A PATH_B [--batch_size=50] [--inception_weights=FILE]

Each path is an image folder, a .tar of images or an .npz of uint8 images [N, H, W, 3]. Images go through the
TF-FID preprocessing: bilinear resize to 299x299 with half-pixel centres and no antialiasing, then
(x - 128) / 128 (see `evaluation.inception`). Unreadable files are skipped and counted. The output ends with
one JSON line {"fid": X, "kid": Y, "n_a": N, "n_b": M} (N, M: images used).

FID has a bias that grows as the sets shrink: compare FIDs only between sets of equal size, and prefer KID
below ~10k images (docs/evaluation.md).
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from gaussiantoken_jax.evaluation import fid as fid_lib
from gaussiantoken_jax import cli_flags, command_line
from gaussiantoken_jax.evaluation import image_sets, inception

_DEFAULT_BATCH_SIZE = 50  # Inception batch when --batch_size is not given


def set_features(image_set: image_sets.ImageSet, params, batch_size: int) -> np.ndarray:
  """float32 [N, 2048] pool3 features of every readable image of the set, with progress lines."""
  features, done, start = [], 0, time.monotonic()
  for batch in image_set.batches(batch_size):
    features.append(inception.compute_features(params, batch))
    done += batch.shape[0]
    if len(features) % 20 == 0:
      np.asarray(features[-1])  # wait for it, so that the rate is real
      rate = done / (time.monotonic() - start)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", image_set.path, done, image_set.num_files,
                   rate, (image_set.num_files - done) / rate)
  if done < 2:
    raise ValueError(f"{image_set.path!r} has {done} readable images; FID needs at least 2 in each set.")
  return np.concatenate([np.asarray(f) for f in features])


def compare(path_a: str | os.PathLike, path_b: str | os.PathLike, *, batch_size: int = 50,
            inception_params=None) -> dict[str, float | int]:
  """{"fid", "kid", "kid_std", "n_a", "n_b", "skipped_a", "skipped_b"} between two image sets."""
  set_a, set_b = image_sets.ImageSet(path_a), image_sets.ImageSet(path_b)  # both checked before the work
  for image_set in (set_a, set_b):
    if image_set.num_files < 2:
      raise ValueError(f"{image_set.path!r} has {image_set.num_files} image files; FID needs at least 2 in each set.")
  params = inception_params if inception_params is not None else inception.load_inception_params()
  features_a = set_features(set_a, params, batch_size)
  features_b = set_features(set_b, params, batch_size)
  scores = fid_lib.fid_and_kid(features_a, features_b)
  return {**scores, "n_a": features_a.shape[0], "n_b": features_b.shape[0], "skipped_a": set_a.num_skipped,
          "skipped_b": set_b.num_skipped}


def main(argv):
  if len(argv) != 3:
    raise app.UsageError(f"Expected two paths (PATH_A PATH_B), got {argv[1:]}.")
  weights = cli_flags.INCEPTION_WEIGHTS.value
  params = None if weights is None else inception.load_inception_params(weights)
  result = compare(argv[1], argv[2], batch_size=cli_flags.BATCH_SIZE.value or _DEFAULT_BATCH_SIZE,
                   inception_params=params)
  for side in ("a", "b"):
    if result[f"skipped_{side}"]:
      print(f"Skipped {result[f'skipped_{side}']} unreadable file(s) in {argv[1 if side == 'a' else 2]}.")
  print(f"FID: {result['fid']:.4f}  ({result['n_a']} vs {result['n_b']} images)")
  one_subset = result["n_a"] == result["n_b"] <= fid_lib.KID_SUBSET_SIZE  # every subset would be all of both
  print(f"KID: {result['kid']:.6f}" + (" (one subset of all the images: no spread)" if one_subset else
                                       f" +- {result['kid_std']:.6f}"))
  print(json.dumps(result))


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli_flags)  # --batch_size and --inception_weights in --helpshort
  command_line.run(main)
