"""Host transforms (decode, crops, resizes) and the device helpers of gaussiantoken_jax.data.

References are written here from the formulas: the linear-ramp checks evaluate, in float64, the ramp at the
continuous source point each output pixel centre maps to (a symmetric resampling filter reproduces a linear
function exactly away from the borders), and the crop offsets are torchvision's published formulas.
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from gaussiantoken_jax import data
from gaussiantoken_jax.data import transforms

RAMP_C = 10.0


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _slopes(height, width):
  # As steep as uint8 allows, so that a geometry error of half a source pixel (DX / 2) stands out.
  return 200.0 / width, 40.0 / height


def _ramp(height, width):
  """uint8 image whose three channels are the linear function f(x, y) = DX x + DY y + C of the pixel index."""
  dx, dy = _slopes(height, width)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  return np.repeat(np.rint(dx * x + dy * y + RAMP_C)[:, :, None], 3, axis=2).astype(np.uint8)


def _expected_ramp(image_shape, box, size, flipped=False):
  """float64 ramp at the source point of each output pixel centre for `box` = (top, left, h, w) -> [size, size]."""
  dx, dy = _slopes(*image_shape[:2])
  top, left, height, width = box
  centre = (np.arange(size) + 0.5) / size
  x = left + centre * width - 0.5  # Continuous pixel-edge coordinate -> pixel-index coordinate.
  y = top + centre * height - 0.5
  if flipped:
    x = x[::-1]
  return dx * x[None, :] + dy * y[:, None] + RAMP_C


def _assert_interior_close(out, expected, margin):
  """Compares away from the borders, where the resampling filter is truncated.

  Each pixel may be off by about one level (the input ramp and the output are both rounded to uint8), and the
  mean error by a few tenths (the rounding errors of a small regular grid do not cancel); a geometry mistake of
  half a source pixel would shift the mean by DX / 2 >= 0.6.
  """
  assert out.dtype == np.uint8 and out.shape[-1] == 3
  for c in range(3):
    diff = out[margin:-margin, margin:-margin, c].astype(np.float64) - expected[margin:-margin, margin:-margin]
    assert np.abs(diff).max() < 1.1
    assert abs(diff.mean()) < 0.3


# ---------------------------------------------------------------------------------------------------------------
# Decoding.


def test_decode_rgb_png_is_exact():
  rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  png = _encode(Image.fromarray(rgb))
  out = transforms.decode_image(png)
  np.testing.assert_array_equal(out, rgb)
  # Any bytes-like buffer (a reader may hand over a bytearray or a view of a larger buffer).
  for data in (bytearray(png), memoryview(b"prefix" + png)[6:]):
    np.testing.assert_array_equal(transforms.decode_image(data), rgb)


def test_decode_grey_palette_rgba_and_16_bit():
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 256, (6, 4), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(_encode(Image.fromarray(grey, "L"))),
                                np.repeat(grey[:, :, None], 3, axis=2))

  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  indices = rng.integers(0, 256, (6, 4), dtype=np.uint8)
  img = Image.frombytes("P", (4, 6), indices.tobytes())
  img.putpalette(palette.reshape(-1).tolist())
  np.testing.assert_array_equal(transforms.decode_image(_encode(img)), palette[indices])

  rgba = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(_encode(Image.fromarray(rgba, "RGBA"))), rgba[:, :, :3])

  # Every 16-bit value once (256 x 256): a scale off by one part in 65535 (255 / 65536, say) rounds some of them
  # to the other side of a half, which a few random values would rarely hit.
  wide = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  decoded = transforms.decode_image(_encode(Image.fromarray(wide)))
  expected = np.rint(wide.astype(np.float64) * 255.0 / 65535.0)
  np.testing.assert_array_equal(decoded, np.repeat(expected[:, :, None], 3, axis=2).astype(np.uint8))
  # CMYK (print JPEGs): flat cyan, magenta and white come out as RGB (0, 255, 255), (255, 0, 255) and white, up to
  # the JPEG's rounding of a flat colour (a level or two).
  for cmyk, rgb in (((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)), ((0, 0, 0, 0), (255,) * 3)):
    decoded = transforms.decode_image(_encode(Image.new("CMYK", (8, 8), cmyk), "JPEG", quality=95))
    assert decoded.shape == (8, 8, 3)
    np.testing.assert_allclose(decoded.reshape(-1, 3), np.broadcast_to(rgb, (64, 3)), atol=3)
  # A 16-bit PGM opens in Pillow's 32-bit mode "I", not "I;16": scaled the same way, not clipped at 255.
  pgm = _encode(Image.fromarray(wide[::16, ::16].copy()), "PPM")
  assert Image.open(io.BytesIO(pgm)).mode == "I"
  np.testing.assert_array_equal(transforms.decode_image(pgm)[..., 0], expected[::16, ::16].astype(np.uint8))


@pytest.mark.parametrize("orientation,expected_fn", [
    (2, np.fliplr),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),  # EXIF 6: the stored picture must be turned 90 degrees clockwise.
    (8, lambda a: np.rot90(a, 1)),
])
def test_decode_applies_exif_orientation(orientation, expected_fn):
  rgb = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = orientation
  out = transforms.decode_image(_encode(Image.fromarray(rgb), exif=exif.tobytes()))
  np.testing.assert_array_equal(out, expected_fn(rgb))


def test_decode_rejects_corrupt_bytes_and_non_bytes():
  jpeg = _encode(Image.fromarray(_ramp(64, 64)), "JPEG", quality=90)
  for bad in (b"", b"this is a text file, not a PNG\n", jpeg[:len(jpeg) // 2]):
    with pytest.raises(transforms.CorruptImageError):
      transforms.decode_image(bad)
  with pytest.raises(ValueError, match="`data`"):
    transforms.decode_image(np.zeros(4, np.uint8))


def test_check_image_errors_name_the_argument():
  with pytest.raises(ValueError, match="`image`.*dtype uint8.*float32"):
    transforms.resize_short_side_center_crop(np.zeros((4, 4, 3), np.float32), 2)
  with pytest.raises(ValueError, match=r"`image`.*\[H, W, 3\].*\(4, 4\)"):
    transforms.center_crop(np.zeros((4, 4), np.uint8), 2)
  with pytest.raises(ValueError, match="`size`"):
    transforms.center_crop(np.zeros((4, 4, 3), np.uint8), 0)


# ---------------------------------------------------------------------------------------------------------------
# Geometry of crops and resizes.


def test_resize_short_side_center_crop_geometry():
  image = _ramp(90, 150)  # Short side 90: the central 90 x 90 square starts at column 30, resized to 30 (x3).
  out = transforms.resize_short_side_center_crop(image, 30)
  assert out.shape == (30, 30, 3)
  _assert_interior_close(out, _expected_ramp(image.shape, (0.0, 30.0, 90, 90), 30), margin=2)
  # An odd margin: the square is central to the half pixel (columns from 30.5); starting it at a whole pixel moves
  # the ramp by DX / 2 = 0.66 levels.
  image = _ramp(90, 151)
  _assert_interior_close(transforms.resize_short_side_center_crop(image, 30),
                         _expected_ramp(image.shape, (0.0, 30.5, 90, 90), 30), margin=2)


def test_resize_box_fractional_box_and_upsampling():
  image = _ramp(40, 60)
  box = (3.5, 10.25, 20.0, 30.0)
  _assert_interior_close(transforms.resize_box(image, box, 12), _expected_ramp(image.shape, box, 12), margin=2)
  _assert_interior_close(transforms.resize_box(image, box, 50), _expected_ramp(image.shape, box, 50), margin=3)
  # Bilinear, not another filter (bicubic and Lanczos reproduce a ramp too): a row [0, 200] doubled samples it at
  # -0.25, 0.25, 0.75 and 1.25, weights 3/4 and 1/4 between the two pixels (PIL renormalises the weights of the
  # pixels inside at the borders), which bicubic puts at 41 and 159 instead of 50 and 150. PIL's fixed-point
  # arithmetic: within a level.
  two = np.repeat(np.array([[0, 200]] * 2, np.uint8)[:, :, None], 3, axis=2)
  doubled = transforms.resize_box(two, (0, 0, 2, 2), 4)
  np.testing.assert_allclose(doubled[:, :, 0], np.broadcast_to([0, 50, 150, 200], (4, 4)), atol=1)
  for empty in ((3, 10, 0, 5), (3, 10, 5, -1)):
    with pytest.raises(ValueError, match="`box` must have positive height and width"):
      transforms.resize_box(image, empty, 4)


def test_center_crop_matches_torchvision_offsets_and_pads_black():
  image = np.random.default_rng(2).integers(1, 256, (37, 50, 3), dtype=np.uint8)
  # torchvision CenterCrop: top = round((37 - 32) / 2) = round(2.5) = 2 (round half to even), left = 9.
  np.testing.assert_array_equal(transforms.center_crop(image, 32), image[2:34, 9:41])
  small = image[:20, :25]
  out = transforms.center_crop(small, 32)
  # Padding (32 - 20) // 2 = 6 rows above, 6 below; (32 - 25) // 2 = 3 columns left, 4 right.
  np.testing.assert_array_equal(out[6:26, 3:28], small)
  assert out.shape == (32, 32, 3) and out.sum() == small.astype(np.int64).sum()


@pytest.mark.parametrize("height, width", [(11, 4), (12, 4), (13, 4), (4, 11), (4, 13), (10, 14)])
def test_center_crop_rounds_half_offsets_to_even_like_torchvision(height, width):
  """torchvision's `int(round((n - size) / 2))` is Python's round, half to even: margins of 7 and 9 start the
  crop at 4 (3.5 up) and 4 (4.5 down); a floor or a ceiling misses one of them."""
  image = np.random.default_rng(height * 100 + width).integers(1, 256, (height, width, 3), dtype=np.uint8)
  size = 4
  top = {0: 0, 7: 4, 8: 4, 9: 4, 6: 3, 10: 5}[height - size]
  left = {0: 0, 7: 4, 9: 4, 6: 3, 10: 5}[width - size]
  np.testing.assert_array_equal(transforms.center_crop(image, size), image[top:top + size, left:left + size])


def test_resize_box_of_the_output_size_is_an_exact_crop():
  """A box of `size` x `size` pixels at whole-pixel offsets samples every source pixel at its centre: the crop
  itself, even where the image is larger than the box (the shortcut for boxes that are the whole image must
  not take it)."""
  image = np.random.default_rng(11).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.resize_box(image, (3, 10, 12, 12), 12), image[3:15, 10:22])
  np.testing.assert_array_equal(transforms.resize_box(image[:12, :12], (0, 0, 12, 12), 12), image[:12, :12])


def test_sample_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(3)
  height, width = 300, 400
  fractions, aspects = [], []
  for _ in range(2000):
    top, left, h, w = transforms.sample_resized_crop_box(rng, height, width)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    fractions.append(h * w / (height * width))
    aspects.append(w / h)
  fractions, aspects = np.array(fractions), np.array(aspects)
  rounding = 0.02  # Box sides are rounded to whole pixels.
  assert fractions.min() >= 0.08 - rounding and fractions.max() <= 1.0
  assert aspects.min() >= 0.75 - rounding and aspects.max() <= 4 / 3 + rounding
  # The area fraction is uniform on [0.08, 1] before rejections, which only remove large boxes: mean < 0.54.
  assert 0.35 < fractions.mean() < 0.54


def test_crop_boxes_reach_every_position_and_keep_their_aspect():
  """Placement is uniform over every position that fits, both ends included (torchvision draws
  `randint(0, H - h + 1)`), and an asymmetric `ratio` is width / height (the default ratio range is symmetric
  in log, so swapping the two would go unseen there)."""
  rng = np.random.default_rng(12)
  # scale (0.64, 0.64) and ratio (1, 1) on 10 x 10: always an 8 x 8 box, at rows and columns 0, 1 or 2.
  boxes = [transforms.sample_resized_crop_box(rng, 10, 10, scale=(0.64, 0.64), ratio=(1.0, 1.0))
           for _ in range(200)]
  assert {box[2:] for box in boxes} == {(8, 8)}
  assert {box[0] for box in boxes} == {box[1] for box in boxes} == {0, 1, 2}
  # min_side = short side: the square is the full height, at columns 0 .. 4.
  boxes = [transforms.sample_scale_crop_box(rng, 10, 14, 10) for _ in range(200)]
  assert {box[0] for box in boxes} == {0} and {box[1] for box in boxes} == set(range(5))
  boxes = [transforms.sample_scale_crop_box(rng, 14, 10, 10) for _ in range(200)]
  assert {box[0] for box in boxes} == set(range(5)) and {box[1] for box in boxes} == {0}
  for _ in range(200):
    _, _, h, w = transforms.sample_resized_crop_box(rng, 300, 400, scale=(0.2, 0.5), ratio=(1.5, 2.0))
    assert 1.5 - 0.02 <= w / h <= 2.0 + 0.02  # 0.02: sides rounded to whole pixels, as above


def _torchvision_get_params(rng, height, width, scale, ratio):
  """torchvision's `RandomResizedCrop.get_params` (torchvision/transforms/transforms.py, 0.15-0.20) as published,
  its torch draws (`uniform_`, `randint`) taken from `rng` in the same order."""
  area = height * width
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(np.sqrt(target_area * aspect_ratio)))
    h = int(round(np.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width, scale, ratio", [
    (300, 400, transforms.RRC_SCALE, transforms.RRC_RATIO),
    (10, 60, transforms.RRC_SCALE, transforms.RRC_RATIO),  # a strip: 10-25% of the tries fit, the fallback is common
    (10, 20, (0.75, 0.75), (1.5, 1.5)),  # always a 10 x 15 box: the full height must count as fitting
])
def test_sample_resized_crop_box_is_torchvisions_get_params(height, width, scale, ratio):
  """The same boxes, draw for draw, as torchvision's algorithm: ten tries, sides rounded, boxes that fill a side
  accepted, then the fallback (the draws continue from where the previous box left the generator)."""
  ours, reference = np.random.default_rng(14), np.random.default_rng(14)
  for _ in range(300):
    assert (transforms.sample_resized_crop_box(ours, height, width, scale, ratio)
            == _torchvision_get_params(reference, height, width, scale, ratio))


def test_sample_resized_crop_box_fallback_is_central_clamped_ratio():
  rng = np.random.default_rng(4)
  # A 10 x 1000 strip admits no box of area >= 8% with aspect <= 4/3: torchvision's fallback is the central
  # box of the full height and width = round(10 * 4/3) = 13.
  assert transforms.sample_resized_crop_box(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
  assert transforms.sample_resized_crop_box(rng, 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_random_resized_crop_samples_then_resizes_then_flips(seed):
  image = _ramp(120, 160)
  out = transforms.random_resized_crop(image, np.random.default_rng(seed), 24)
  # The same generator draws the box first, then the flip coin.
  rng = np.random.default_rng(seed)
  box = transforms.sample_resized_crop_box(rng, 120, 160)
  flipped = rng.random() < 0.5
  _assert_interior_close(out, _expected_ramp(image.shape, box, 24, flipped), margin=3)


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_random_scale_crop_samples_then_resizes_then_flips(seed):
  image = _ramp(120, 160)
  out = transforms.random_scale_crop(image, np.random.default_rng(seed), 24)
  rng = np.random.default_rng(seed)
  box = transforms.sample_scale_crop_box(rng, 120, 160, 24)  # (height, width): the image's own order
  flipped = rng.random() < 0.5
  _assert_interior_close(out, _expected_ramp(image.shape, box, 24, flipped), margin=3)


def test_random_scale_crop_boxes_are_square_and_in_range():
  rng = np.random.default_rng(9)
  sides = []
  for _ in range(500):
    top, left, h, w = transforms.sample_scale_crop_box(rng, 200, 300, 32)
    assert h == w and 32 <= h <= 200 and top + h <= 200 and left + w <= 300
    sides.append(h)
  # log-uniform side on [32, 200]: the median is the geometric mean, sqrt(32 * 200) = 80.
  assert 65 < np.median(sides) < 95
  assert transforms.random_scale_crop(_ramp(200, 300), rng, 32).shape == (32, 32, 3)
  # An image smaller than the crop size gives the whole (short side) square, upsampled.
  assert transforms.sample_scale_crop_box(rng, 10, 12, 32)[2:] == (10, 10)


# ---------------------------------------------------------------------------------------------------------------
# Device side.


@jax.jit
def _scale(images):
  return data.to_model_input(images)


def test_to_model_input_maps_uint8_to_unit_interval():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
  out = np.asarray(_scale(pixels))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, pixels.astype(np.float64) / 127.5 - 1.0, atol=1e-6)
  assert out.min() == -1.0 and out.max() == 1.0
  with pytest.raises(ValueError, match="`images`.*uint8.*float32"):
    data.to_model_input(jnp.zeros((1, 2, 2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"`images`.*\[B, H, W, 3\]"):
    data.to_model_input(jnp.zeros((2, 2, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r"`images`.*\[B, H, W, 3\], got \(1, 2, 2, 4\)"):  # RGBA: 3 channels only
    data.to_model_input(jnp.zeros((1, 2, 2, 4), jnp.uint8))


def test_to_global_array_shards_the_batch_over_devices():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = len(jax.devices())
  batch = {"image": np.random.default_rng(10).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
           "mask": np.arange(n) % 3 > 0}
  out = data.to_global_array(batch, sharding)
  for name in batch:
    assert out[name].shape == batch[name].shape and out[name].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[name]), batch[name])
  assert len(out["image"].addressable_shards) == n
  with pytest.raises(ValueError, match="`sharding`"):
    data.to_global_array(batch, None)
  with pytest.raises(ValueError, match="leading"):
    data.to_global_array({"image": batch["image"], "mask": batch["mask"][:2]}, sharding)
  with pytest.raises(ValueError, match="`batch\\['image'\\]`"):
    data.to_global_array({"image": [1, 2]}, sharding)
