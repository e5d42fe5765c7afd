r"""Input pipeline throughput: images/s of `make_train_loader` for the CIFAR and 256x256 settings.

    python benchmarks/input_bench.py [--cifar=PATH] [--imagenet=PATH] [--workers=0,1,2] [--seconds=10]

CIFAR setting: 32 x 32, no augmentation, batch 128, read from `--cifar` (an image folder or .tar; default the
CIFAR-10 JPEG tar in ../shared/data when present, else the demo photos). 256 setting: random-resized-crop +
flip to 256 x 256, batch 64, from `--imagenet` (default the ImageNet sample tar in ../shared/data when present,
else the demo photos). Each row: one process, `num_workers` grain worker processes; the clock starts after
the first batches (worker start-up) and runs for `--seconds`. Prints one table; record it in docs/data.md
together with the machine's core count.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
import ml_collections

from gaussiantoken_jax import data

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
_CIFAR = flags.DEFINE_string("cifar", os.path.join(_SHARED, "cifar10-jpeg-train.tar"),
                             "Image folder / .tar for the 32 px setting ('demo' = the demo photos).")
_IMAGENET = flags.DEFINE_string("imagenet", os.path.join(_SHARED, "imagenet-sample-800.tar"),
                                "Image folder / .tar for the 256 px setting ('demo' = the demo photos).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Measured time per row.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 3, "Batches read before the clock starts.")


def _config(path: str, image_size: int, augment: str, batch_size: int, num_workers: int):
  source = "demo" if path == "demo" or not os.path.exists(path) else "folder"
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, seed=0,
      data=dict(source=source, name="", data_dir=None, path="" if source == "demo" else path, split_file="",
                train_split="train" if source == "demo" else "", eval_split="test", image_size=image_size,
                augment=augment, eval_crop="resize_center", num_workers=num_workers, prefetch_buffer_size=2,
                eval_batch_size=0)))


def measure(config, seconds: float, warmup_batches: int) -> float:
  """Images/s delivered by the training loader after `warmup_batches` batches."""
  iterator = iter(data.make_train_loader(config))
  for _ in range(warmup_batches):
    next(iterator)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    images += next(iterator)["image"].shape[0]
  return images / (time.perf_counter() - start)


def main(argv):
  del argv
  settings = [("CIFAR 32 px, no augmentation", _CIFAR.value, 32, "none", 128),
              ("256 px, random-resized-crop + flip", _IMAGENET.value, 256, "random_resized_crop", 64)]
  print(f"{os.cpu_count()} CPU cores; one process; {_SECONDS.value:.0f} s a row after "
        f"{_WARMUP_BATCHES.value} warm-up batches")
  print("| setting | data | batch | workers | images/s |\n|---|---|---|---|---|")
  for name, path, size, augment, batch_size in settings:
    for workers in map(int, _WORKERS.value):
      config = _config(path, size, augment, batch_size, workers)
      rate = measure(config, _SECONDS.value, _WARMUP_BATCHES.value)
      where = "demo photos" if config.data.source == "demo" else os.path.basename(path)
      print(f"| {name} | {where} | {batch_size} | {workers} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
