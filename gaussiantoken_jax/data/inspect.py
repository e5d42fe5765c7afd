r"""Look at what the input pipeline feeds the model, like `tfds.show_examples`.

    python -m gaussiantoken_jax.data.inspect --data=<TFDS name | image folder or .tar | demo> \
        [--split=...] [--image_size=N] [--output=grid.png] [--augment]

Reads the whole split once through the evaluation pipeline (`make_eval_loader`: decode, crop, batch, with
`--augment` the training transform instead), writes a grid of the first batch, logs every file it skipped and
why, and prints as its LAST line one JSON object `{"images": N, "skipped": M}`: N images delivered, M records
that could not be decoded.

Examples:
    python -m gaussiantoken_jax.data.inspect --data=demo --image_size=64 --output=/tmp/demo.png
    python -m gaussiantoken_jax.data.inspect --data=demo --split=train --augment --output=/tmp/demo_train.png
    python -m gaussiantoken_jax.data.inspect --data=cifar10 --split=test --image_size=32
    python -m gaussiantoken_jax.data.inspect --data=/path/to/images.tar --image_size=256
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags, logging
import ml_collections
import numpy as np
from PIL import Image

from gaussiantoken_jax import cli_flags, command_line
from gaussiantoken_jax.data import pipeline
from gaussiantoken_jax.train import writers

_DATA = flags.DEFINE_string("data", None, "'demo', an image folder / .tar archive, or a TFDS dataset name.")
_SPLIT = flags.DEFINE_string("split", None, "Split: demo 'train'/'test' (default 'test'); TFDS split (default "
                             "'train'); folder subfolder (default '' = all files).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side S of the square images.")
_DEFAULT_BATCH_SIZE = 64  # when --batch_size (shared with the other commands, cli_flags) is not given
_EVAL_CROP = flags.DEFINE_enum("eval_crop", "resize_center", pipeline.EVAL_CROPS, "Evaluation crop.")
_AUGMENT = flags.DEFINE_boolean("augment", False, "Show the training transform (random crops) instead.")
_TRAIN_AUGMENT = flags.DEFINE_enum("train_augment", "random_resized_crop", pipeline.AUGMENTS,
                                   "With --augment on a TFDS/folder source: which training augmentation.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
_SPLIT_FILE = flags.DEFINE_string("split_file", "", "Folder source: optional list of relative paths.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes.")
_OUTPUT = flags.DEFINE_string("output", "", "Where to write the grid PNG ('' = no picture).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the --augment crops.")


def inspect_config(data: str, split: str | None, image_size: int, batch_size: int, *, eval_crop="resize_center",
                   augment="random_resized_crop", data_dir=None, split_file="", num_workers=0,
                   seed=0) -> ml_collections.ConfigDict:
  """A config whose eval split is the split to inspect; `data` as the --data flag."""
  if data == "demo":
    source, name, path, default_split = "demo", "", "", "test"
  elif os.path.exists(data) or "{split}" in data or data.startswith(("/", ".", "~")) or data.endswith(".tar"):
    # A path, existing or not (a TFDS name, e.g. cifar10/3.0.2, starts with a letter): the folder source says
    # what is missing.
    source, name, path, default_split = "folder", "", data, ""
  else:
    source, name, path, default_split = "tfds", data, "", "train"
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, seed=seed,
      data=dict(source=source, name=name, data_dir=data_dir, path=path, split_file=split_file,
                train_split=default_split if split is None else split,
                eval_split=default_split if split is None else split, image_size=image_size, augment=augment,
                eval_crop=eval_crop, num_workers=num_workers, prefetch_buffer_size=2, eval_batch_size=0)))


def image_grid(images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3] -> one uint8 picture, ceil(sqrt(N)) images a row, 2-pixel white gutters and border."""
  cols = math.ceil(math.sqrt(len(images)))
  grid = writers.image_grid(images, rows=math.ceil(len(images) / cols), padding=2, pad_value=255)
  return np.pad(grid, ((2, 2), (2, 2), (0, 0)), constant_values=255)


def run(config: ml_collections.ConfigDict, *, augment: bool, output: str) -> dict:
  """One pass over the eval split of `config`; writes the first batch's grid to `output`; returns the counts."""
  start = time.perf_counter()
  loader = pipeline.make_eval_loader(config, augment=augment)
  logging.info("Reading %d records of %s split %r (%d batches of %d).", loader.num_records, config.data.source,
               config.data.eval_split, loader.num_batches, loader.batch_size)
  delivered = 0
  for batch in loader:
    real = batch["image"][batch["mask"]]
    if delivered == 0 and len(real) and output:
      Image.fromarray(image_grid(real)).save(output)
      logging.info("Wrote a grid of %d images of %s to %s.", len(real), real.shape[1:], output)
    delivered += len(real)
  seconds = time.perf_counter() - start
  skipped = loader.num_records - delivered
  logging.info("Delivered %d images, skipped %d unreadable records, in %.1f s (%.0f images/s).", delivered, skipped,
               seconds, delivered / max(seconds, 1e-9))
  return {"images": delivered, "skipped": skipped}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.refuse("data.inspect", cli_flags.INCEPTION_WEIGHTS)
  batch_size = cli_flags.BATCH_SIZE.value or _DEFAULT_BATCH_SIZE
  config = inspect_config(_DATA.value, _SPLIT.value, _IMAGE_SIZE.value, batch_size,
                          eval_crop=_EVAL_CROP.value, augment=_TRAIN_AUGMENT.value, data_dir=_DATA_DIR.value,
                          split_file=_SPLIT_FILE.value, num_workers=_NUM_WORKERS.value, seed=_SEED.value)
  counts = run(config, augment=_AUGMENT.value, output=_OUTPUT.value)
  print(json.dumps(counts), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("data")
  flags.declare_key_flag("batch_size")  # in --helpshort
  command_line.run(main)
