"""Evaluation pictures as uint8 RGB arrays (PNG / TensorBoard ready), drawn with PIL.

* `reconstruction_grid`: originals above their reconstructions, upscaled with nearest neighbour so that
  32-pixel images are large enough to see.
* `gaussian_overlay`: each image with its Gaussians drawn as 2-sigma ellipses, coloured by codebook index (the
  same index always gets the same colour, neighbouring indices get distant hues).
* `codebook_usage_plot`: code frequencies sorted from most to least used, with the fraction of codes used and
  the perplexity in the title.

Gaussian geometry follows `splatting`: a mean (mx, my) in [-1, 1] sits at ((mx + 1) / 2 * w, (my + 1) / 2 * h)
on the h x w feature map whose pixel (i, j) covers [j, j + 1) x [i, i + 1); the Gaussian's first axis points
along (cos r, sin r) with standard deviation scales[0], the second along (-sin r, cos r) with scales[1].
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from gaussiantoken_jax.train import writers

# Pictures are upscaled until an image is at least this many pixels wide.
MIN_DISPLAY_SIZE = 128
_PADDING = 2
_PAD_VALUE = 255
_ELLIPSE_POINTS = 48
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def _check_uint8_images(where: str, name: str, images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"{where}: `{name}` must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} of shape "
                     f"{images.shape}.")
  return images


def display_scale(image_size: int, min_size: int = MIN_DISPLAY_SIZE) -> int:
  """The integer nearest-neighbour upscaling factor that makes `image_size` at least `min_size` pixels."""
  return max(1, math.ceil(min_size / image_size))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of [N, H, W, C] by an integer factor."""
  return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def reconstruction_grid(originals, reconstructions, *, min_size: int = MIN_DISPLAY_SIZE) -> np.ndarray:
  """Originals (top row) above their reconstructions (bottom row), upscaled: uint8 [H, W, 3]."""
  originals = _check_uint8_images("reconstruction_grid", "originals", originals)
  reconstructions = _check_uint8_images("reconstruction_grid", "reconstructions", reconstructions)
  if originals.shape != reconstructions.shape:
    raise ValueError(f"reconstruction_grid: `originals` and `reconstructions` must have the same shape, got "
                     f"{originals.shape} and {reconstructions.shape}.")
  factor = display_scale(originals.shape[1], min_size)
  return writers.image_grid(upscale(np.concatenate([originals, reconstructions]), factor), rows=2,
                            padding=_PADDING, pad_value=_PAD_VALUE)


def code_colour(index: int) -> tuple[int, int, int]:
  """A saturated RGB colour for a codebook index; the golden-ratio hue sequence keeps neighbours apart."""
  hue = (int(index) * _GOLDEN_RATIO_CONJUGATE) % 1.0
  return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.95, 1.0))


def ellipse_points(centre_x: float, centre_y: float, rotation: float, scale_x: float, scale_y: float,
                   n_sigma: float = 2.0, num_points: int = _ELLIPSE_POINTS) -> np.ndarray:
  """[num_points, 2] (x, y) points of the n-sigma contour of one Gaussian (same units as centre and scales)."""
  t = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
  u, v = n_sigma * scale_x * np.cos(t), n_sigma * scale_y * np.sin(t)
  cos, sin = math.cos(rotation), math.sin(rotation)
  return np.stack([centre_x + u * cos - v * sin, centre_y + u * sin + v * cos], axis=-1)


def gaussian_overlay(images, means, rotations, scales, indices, *, feature_shape: tuple[int, int],
                     min_size: int = MIN_DISPLAY_SIZE) -> np.ndarray:
  """The images (upscaled) with their Gaussians as 2-sigma ellipses coloured by code: uint8 [H, W, 3].

  Args:
    images: uint8 [N, S, S, 3], the images the Gaussians were computed from.
    means: [N, K, 2] in [-1, 1]; rotations [N, K]; scales [N, K, 2] in feature-map pixels.
    indices: int [N, K] codebook index of each Gaussian's feature.
    feature_shape: (h, w) of the feature map the Gaussians are splatted on.
  """
  images = _check_uint8_images("gaussian_overlay", "images", images)
  n, size = images.shape[0], images.shape[1]
  means, rotations = np.asarray(means, np.float64), np.asarray(rotations, np.float64)
  scales, indices = np.asarray(scales, np.float64), np.asarray(indices)
  k = means.shape[1] if means.ndim == 3 else -1
  for name, value, shape in (("means", means, (n, k, 2)), ("rotations", rotations, (n, k)),
                             ("scales", scales, (n, k, 2)), ("indices", indices, (n, k))):
    if k < 1 or value.shape != shape:
      raise ValueError(f"gaussian_overlay: `{name}` must have shape {shape} ([N, K, 2] means, [N, K] rotations "
                       f"and indices, [N, K, 2] scales), got {value.shape}.")
  factor = display_scale(size, min_size)
  cell = size * factor
  height, width = feature_shape
  # Feature-map units -> picture pixels; PIL puts integer coordinates at pixel centres, hence the -0.5.
  unit_x, unit_y = cell / width, cell / height
  tiles = []
  for i, tile in enumerate(upscale(images, factor)):
    tile = Image.fromarray(tile)  # drawn one image at a time: an ellipse past the edge stays off its neighbour
    draw = ImageDraw.Draw(tile)
    # Draw the widest Gaussians first so that small ones stay visible on top.
    for g in np.argsort(-scales[i].prod(axis=-1)):
      centre_x = (means[i, g, 0] + 1.0) * 0.5 * width
      centre_y = (means[i, g, 1] + 1.0) * 0.5 * height
      points = ellipse_points(centre_x, centre_y, rotations[i, g], scales[i, g, 0], scales[i, g, 1])
      xy = [(x * unit_x - 0.5, y * unit_y - 0.5) for x, y in points]
      draw.line(xy + xy[:1], fill=code_colour(indices[i, g]), width=max(1, factor // 2))
    tiles.append(np.asarray(tile))
  return writers.image_grid(np.stack(tiles), rows=1, padding=_PADDING, pad_value=_PAD_VALUE)


def codebook_usage_plot(counts, *, perplexity: float | None = None, width: int = 640,
                        height: int = 320) -> np.ndarray:
  """Bar chart of the code frequencies sorted in decreasing order: uint8 [height, width, 3].

  The title gives the number and fraction of codes used (count > 0) and, if given, the perplexity; the y
  axis is the share of all tokens, from 0 to the most used code's share.
  """
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0):
    raise ValueError(f"codebook_usage_plot: `counts` must be a non-negative vector [codebook_size], got shape "
                     f"{counts.shape}.")
  total = counts.sum()
  shares = np.sort(counts.astype(np.float64))[::-1] / max(total, 1)
  used = int(np.count_nonzero(counts))
  picture = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(picture)
  title = f"codebook usage: {used}/{counts.size} codes ({100.0 * used / counts.size:.1f}%)"
  if perplexity is not None and math.isfinite(perplexity):
    title += f", perplexity {perplexity:.1f}"
  draw.text((10, 6), title, fill="black")
  left, top, right, bottom = 48, 28, width - 10, height - 24
  peak = shares[0] if shares[0] > 0 else 1.0
  draw.text((4, top - 4), f"{100 * peak:.2g}%", fill="black")
  draw.text((4, bottom - 10), "0", fill="black")
  draw.text((left, bottom + 6), "codes, most used first", fill="black")
  bar_width = (right - left) / counts.size
  for rank, share in enumerate(shares):
    if share > 0:
      x0 = left + rank * bar_width
      draw.rectangle([x0, bottom - (bottom - top) * share / peak, max(x0, x0 + bar_width - 1), bottom],
                     fill=(40, 90, 200))
  draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
  return np.asarray(picture)
