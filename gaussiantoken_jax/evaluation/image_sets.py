"""Image sets for the FID command: an image folder, a tar of images, or an `.npz` of uint8 images.

Folders and tars are read with the data pipeline's `sources.ImageFolderSource` (files with an image extension,
sorted by relative path) and decoded with `transforms.decode_image`, at their native size: the FID network
resizes every image itself. Files that fail to decode are skipped, logged and counted, as in the data
pipeline. Batches hold images of one size: a set whose sizes vary is cut into runs of equal size (each new
batch shape compiles the network once more).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Iterator

import numpy as np

from gaussiantoken_jax.checks import check_positive_int
from gaussiantoken_jax.data import sources, transforms

_log = logging.getLogger(__name__)
_DECODE_THREADS = 8


class ImageSet:
  """A set of images to compute FID statistics of; iterate with `batches(batch_size)`.

  Attributes:
    path: what was given.
    num_files: images found (before decoding).
    num_skipped: files that failed to decode so far (final once `batches` is exhausted).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.num_skipped = 0
    self._array = None
    self._source = None
    if not os.path.exists(self.path):
      raise ValueError(f"image set {self.path!r} does not exist (expected an image folder, a .tar of images or "
                       f"an .npz of uint8 images).")
    if self.path.endswith(".npz"):
      self._array = _load_npz_images(self.path)
      self.num_files = self._array.shape[0]
    else:
      try:
        self._source = sources.ImageFolderSource(self.path)
      except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"image set {self.path!r}: {e}") from e
      self.num_files = len(self._source)

  def _decode(self, index: int) -> np.ndarray | None:
    record = self._source[index]
    try:
      return transforms.decode_image(record["data"])
    except transforms.CorruptImageError as e:
      _log.warning("Skipped unreadable image %r in %s (%s).", record["key"], self.path, e)
      return None

  def _images(self) -> Iterator[np.ndarray]:
    if self._array is not None:
      yield from self._array
      return
    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
      for image in pool.map(self._decode, range(self.num_files)):
        if image is None:
          self.num_skipped += 1
        else:
          yield image

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [<= batch_size, H, W, 3] batches of equal-size images, in file order."""
    check_positive_int("ImageSet.batches", "batch_size", batch_size)
    pending: list[np.ndarray] = []
    for image in self._images():
      if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
        yield np.stack(pending)
        pending = []
      pending.append(image)
    if pending:
      yield np.stack(pending)


def _load_npz_images(path: str) -> np.ndarray:
  """The uint8 [N, H, W, 3] array of an .npz: its only array, or the one called "images"."""
  with np.load(path, allow_pickle=False) as npz:
    keys = list(npz.files)
    key = keys[0] if len(keys) == 1 else "images" if "images" in keys else None
    if key is None:
      raise ValueError(f"image set {path!r}: an .npz must hold one array or one called 'images', got {keys}.")
    images = npz[key]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"image set {path!r}: array {key!r} must be uint8 [N, H, W, 3], got {images.dtype} of shape "
                     f"{images.shape}.")
  return images
