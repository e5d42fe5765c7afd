"""Host-side image transforms: decoding to RGB uint8, training crops and the evaluation protocols.

Everything here is NumPy/PIL on the host and returns uint8 [H, W, 3]; scaling to [-1, 1] happens on the
device (`gaussiantoken_jax.pixels.to_model_input`), so the host ships a quarter of the bytes.

Resizing uses PIL's bilinear filter, which widens its support when it shrinks (antialiasing), like the
reference's torchvision `RandomResizedCrop(antialias=True)`. Crop boxes are in pixel-edge coordinates:
(top, left, height, width) covers rows top .. top + height - 1.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from gaussiantoken_jax.checks import check_positive_int

# torchvision's RandomResizedCrop defaults, which the reference's ImageNet and Mini-ImageNet configs use.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Pillow modes holding more than 8 bits a pixel of a single grey channel; 16-bit PNGs open as one of these.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class CorruptImageError(ValueError):
  """Raised when encoded bytes cannot be decoded into an image (truncated, empty, not an image, too big)."""


def check_image(image, name: str = "image") -> None:
  """Raises ValueError unless `image` is a uint8 [H, W, 3] NumPy array with H, W >= 1."""
  if not isinstance(image, np.ndarray):
    raise ValueError(f"`{name}` must be a NumPy uint8 array [H, W, 3], got {type(image).__name__}.")
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"`{name}` must have shape [H, W, 3] with H, W >= 1, got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"`{name}` must have dtype uint8, got {image.dtype}.")



def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any Pillow mode -> uint8 [H, W, 3]; alpha is dropped, as torchvision's `pil_loader` (`convert("RGB")`)."""
  if img.mode in _WIDE_GREY_MODES:
    # `convert("L")` would clip 16-bit values at 255 instead of scaling them, turning most images white.
    grey = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # Pillow warns when a palette with transparency goes straight to RGB.
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/WebP/BMP/GIF/TIFF bytes to uint8 [H, W, 3], EXIF orientation applied.

  Grey, palette, CMYK, RGBA and 16-bit inputs are converted to 8-bit RGB (16-bit grey is scaled by
  255/65535). Only the first frame of an animation is used.

  Raises:
    ValueError: `data` is not bytes.
    CorruptImageError: the bytes do not decode (empty, truncated, not an image, over Pillow's
      decompression-bomb limit).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"`data` must be the encoded image bytes, got {type(data).__name__}.")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # Decoding is lazy; force it here so that truncation errors surface inside this try.
      return _to_rgb(ImageOps.exif_transpose(img))
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's format plugins raise many exception types on malformed data (OSError, SyntaxError,
    # struct.error, EOFError, DecompressionBombError, ...); this block only decodes, so all of them mean
    # "this file is unreadable".
    raise CorruptImageError(f"{type(e).__name__}: {e}") from e


def resize_box(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
  """Resamples the region `box` = (top, left, height, width) of `image` to [size, size, 3], bilinear.

  The box may have fractional coordinates; PIL resamples it directly without cropping first.
  """
  check_image(image)
  check_positive_int("resize_box", "size", size)
  top, left, height, width = box
  if height <= 0 or width <= 0:
    raise ValueError(f"`box` must have positive height and width, got {box}.")
  if (height, width) == image.shape[:2] == (size, size):
    return image
  img = Image.fromarray(image)
  out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
  return np.asarray(out, dtype=np.uint8)


def resize_short_side_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The standard evaluation protocol: resize the short side to `size`, then take the central square.

  Done as one resample of the central square of side min(H, W), which is the same geometry as resizing
  first and cropping after, with one interpolation instead of two.
  """
  check_image(image)
  check_positive_int("resize_short_side_center_crop", "size", size)
  height, width = image.shape[:2]
  side = min(height, width)
  return resize_box(image, ((height - side) / 2.0, (width - side) / 2.0, side, side), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The reference's evaluation crop: central size x size pixels, no resize; zero (black) padding if smaller.

  Offsets follow torchvision's `CenterCrop`: padding splits as (size - H) // 2 before, the rest after,
  then the crop starts at round((H - size) / 2).
  """
  check_image(image)
  check_positive_int("center_crop", "size", size)
  height, width = image.shape[:2]
  pad_h, pad_w = max(size - height, 0), max(size - width, 0)
  if pad_h or pad_w:
    image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    height, width = image.shape[:2]
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image[top:top + size, left:left + size]


def sample_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`: a box of random area fraction and aspect ratio.

  Ten tries at area ~ U(scale) * H * W and log aspect ~ U(log ratio); if none fits, the largest central box
  whose aspect is clamped into `ratio`. Returns (top, left, box_height, box_width).
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    box_w = int(round(math.sqrt(target_area * aspect)))
    box_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < box_w <= width and 0 < box_h <= height:
      top = int(rng.integers(0, height - box_h + 1))
      left = int(rng.integers(0, width - box_w + 1))
      return top, left, box_h, box_w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    box_w, box_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    box_h, box_w = height, int(round(height * ratio[1]))
  else:
    box_h, box_w = height, width
  return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def sample_scale_crop_box(rng: np.random.Generator, height: int, width: int,
                          min_side: int) -> tuple[int, int, int, int]:
  """A square box whose side is log-uniform in [min(min_side, short), short], uniformly placed.

  For the demo photographs: a log-uniform side visits every zoom level equally, from the whole photo down to
  crops at native resolution, so a few photos yield a practically unlimited number of distinct crops.
  """
  short = min(height, width)
  low = min(min_side, short)
  side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
  side = min(max(side, low), short)
  top = int(rng.integers(0, height - side + 1))
  left = int(rng.integers(0, width - side + 1))
  return top, left, side, side


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = RRC_SCALE,
                        ratio: tuple[float, float] = RRC_RATIO) -> np.ndarray:
  """The reference's 256 px train augmentation: RandomResizedCrop(size) then a random horizontal flip."""
  check_image(image)
  box = sample_resized_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
  return random_flip(resize_box(image, box, size), rng)


def random_scale_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """The demo's train augmentation: a log-uniform-scale square crop resized to `size`, random flip."""
  check_image(image)
  box = sample_scale_crop_box(rng, image.shape[0], image.shape[1], size)
  return random_flip(resize_box(image, box, size), rng)
