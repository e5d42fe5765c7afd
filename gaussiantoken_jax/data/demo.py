"""The embedded demo data: crops of the real photographs that ship inside scikit-image and scikit-learn.

No download and no synthetic images: `configs/demo.py` trains on random crops of nine colour photographs
bundled in the scikit-image and scikit-learn wheels and evaluates on fixed crops of two others, which
training never sees.

  train ("train"):   astronaut, coffee, rocket, hubble_deep_field, immunohistochemistry, retina,
                     motorcycle_left, motorcycle_right (scikit-image), china (scikit-learn)
  held out ("test"): chelsea (scikit-image), flower (scikit-learn)

scikit-image's other bundled pictures are grey, synthetic (colorwheel, logo, chessboard) or need a pooch
download (eagle, lily, ...), so they are not used. `skimage.data.cat` is the same photo as `chelsea`.

The train split has `CROPS_PER_PHOTO` records per photo, all holding the whole photo; the training transform
(`transforms.random_scale_crop`) draws a fresh crop for each, so an "epoch" is just a unit of shuffling.
The test split is a fixed grid of crops at several zoom levels (see `eval_crop_boxes`), deterministic.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from gaussiantoken_jax.data import transforms

SPLITS = ("train", "test")
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "motorcycle_left", "motorcycle_right", "china")
HELD_OUT_PHOTOS = ("chelsea", "flower")
CROPS_PER_PHOTO = 64
# The demo's "epoch" (a unit of shuffling: every record is a fresh random crop of its photo).
TRAIN_RECORDS = len(TRAIN_PHOTOS) * CROPS_PER_PHOTO


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
  """One bundled photograph as uint8 [H, W, 3], by the name used in TRAIN_PHOTOS / HELD_OUT_PHOTOS."""
  if name in ("china", "flower"):
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top  (slow import)
    photo = load_sample_image(f"{name}.jpg")
  elif name in ("motorcycle_left", "motorcycle_right"):
    import skimage.data  # pylint: disable=g-import-not-at-top
    left, right, _ = skimage.data.stereo_motorcycle()
    photo = left if name == "motorcycle_left" else right
  elif name in TRAIN_PHOTOS + HELD_OUT_PHOTOS:
    import skimage.data  # pylint: disable=g-import-not-at-top
    photo = getattr(skimage.data, name)()
  else:
    raise ValueError(f"`name` must be one of {TRAIN_PHOTOS + HELD_OUT_PHOTOS}, got {name!r}.")
  photo = np.ascontiguousarray(photo, dtype=np.uint8)
  transforms.check_image(photo, name)
  photo.setflags(write=False)  # Shared by every record (and cached): nobody may write into it.
  return photo


def eval_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
  """Fixed square crops of a photo: at zoom levels side = short, short/2, short/4, ... while side >= size
  (the first level always), a grid of ceil(H/side) x ceil(W/side) boxes spread evenly from edge to edge.

  Returns (top, left, side, side) boxes, each later resized to size x size.
  """
  boxes = []
  side = min(height, width)
  while True:
    rows, cols = math.ceil(height / side), math.ceil(width / side)
    tops = np.rint(np.linspace(0, height - side, rows)).astype(int)
    lefts = np.rint(np.linspace(0, width - side, cols)).astype(int)
    boxes.extend((int(t), int(l), side, side) for t in tops for l in lefts)
    side //= 2
    if side < size:
      return boxes


class DemoTrainSource:
  """The training photographs, each repeated CROPS_PER_PHOTO times; records hold the whole photo."""

  def __init__(self):
    self._photos = [load_photo(name) for name in TRAIN_PHOTOS]

  def __len__(self) -> int:
    return TRAIN_RECORDS

  def __getitem__(self, index: int) -> dict:
    photo_index = index % len(TRAIN_PHOTOS)
    return {"key": TRAIN_PHOTOS[photo_index], "data": self._photos[photo_index]}

  def __repr__(self) -> str:
    return f"DemoTrainSource(photos={TRAIN_PHOTOS}, num_records={len(self)})"


class DemoEvalSource:
  """Fixed grid crops of the held-out photographs, already size x size."""

  def __init__(self, size: int):
    self._size = size
    self._photos = [load_photo(name) for name in HELD_OUT_PHOTOS]
    self._crops = [(p, box) for p, photo in enumerate(self._photos)
                   for box in eval_crop_boxes(photo.shape[0], photo.shape[1], size)]

  def __len__(self) -> int:
    return len(self._crops)

  def __getitem__(self, index: int) -> dict:
    photo_index, box = self._crops[index]
    return {"key": f"{HELD_OUT_PHOTOS[photo_index]}{list(box)}",
            "data": transforms.resize_box(self._photos[photo_index], box, self._size)}

  def __repr__(self) -> str:
    return f"DemoEvalSource(photos={HELD_OUT_PHOTOS}, size={self._size}, num_crops={len(self)})"


def demo_source(split: str, size: int):
  """The demo source of `split` ("train" or "test") for images of size x size."""
  if split not in SPLITS:
    raise ValueError(f"the demo source's split must be one of {SPLITS}, got {split!r}.")
  return DemoTrainSource() if split == "train" else DemoEvalSource(size)
