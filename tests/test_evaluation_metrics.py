"""FID / KID math and the image metrics against closed forms, NumPy formulas and scikit-image."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from skimage import metrics as skimage_metrics

from gaussiantoken_jax import pixels
from gaussiantoken_jax.evaluation import fid, image_metrics

RNG = np.random.default_rng(0)


def random_covariance(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
  # Commuting (diagonal) covariances: d^2 = |mu_a - mu_b|^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2.
  rng = np.random.default_rng(1)
  mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
  var_a, var_b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  got = fid.frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
  assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_distance_full_covariances_against_scipy_sqrtm():
  rng = np.random.default_rng(2)
  d = 16
  mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
  cov_a, cov_b = random_covariance(rng, d), random_covariance(rng, d)
  # pytorch-fid's formula: Tr(sqrtm(S_a S_b)) with scipy's general (complex) matrix square root.
  expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2.0 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
  assert fid.frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)
  # Symmetric in its two Gaussians.
  assert fid.frechet_distance(mu_b, cov_b, mu_a, cov_a) == pytest.approx(expected, rel=1e-10)


def test_fid_of_samples_identity_symmetry_and_convergence():
  rng = np.random.default_rng(3)
  d, n = 8, 20000
  x = rng.normal(size=(n, d))
  assert abs(fid.fid_from_features(x, x)) < 1e-9
  y = rng.normal(size=(n, d)) * 1.5 + 0.5
  assert fid.fid_from_features(x, y) == pytest.approx(fid.fid_from_features(y, x), rel=1e-10)
  # N(0, I) vs N(0.5, 2.25 I): d^2 = d * 0.25 + d * (1.5 - 1)^2 = 4; sampling error of the fitted moments is
  # about sqrt(d / n) * scale ~ 0.03 in each term.
  assert fid.fid_from_features(x, y) == pytest.approx(d * 0.25 + d * 0.25, abs=0.15)


def test_fid_of_few_samples_matches_the_covariance_route():
  # Fewer samples than dimensions: the sample-space route must equal the D x D eigendecomposition route.
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 2.0 + 0.1
  sa, sb = fid.gaussian_stats(a), fid.gaussian_stats(b)
  expected = fid.frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
  # The covariance route takes square roots of ~30 rounding-level null eigenvalues (~1e-15 each): ~1e-6 off.
  assert fid.fid_from_features(a, b) == pytest.approx(expected, abs=1e-5)
  assert fid.fid_from_features(b, a) == pytest.approx(expected, abs=1e-5)
  assert abs(fid.fid_from_features(a, a)) < 1e-10


def test_kid_against_a_direct_formula_and_unbiased():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(30, 6))
  b = rng.normal(size=(30, 6)) + 0.3
  # With subsets as large as both sets the estimate is the full unbiased MMD^2, written out here by loops.
  def k(x, y):
    return (np.dot(x, y) / 6 + 1.0) ** 3
  m = 30
  xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
  result = fid.kernel_inception_distance(a, b, subset_size=1000)
  assert result.subset_size == 30 and result.std == 0.0
  assert result.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
  # Subsets smaller than the sets: the mean over subsets estimates the same MMD^2 (sampling noise ~ std / 10).
  big_a, big_b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6)) + 0.3
  full = fid.kernel_inception_distance(big_a, big_b, subset_size=400).mean
  sub = fid.kernel_inception_distance(big_a, big_b, subset_size=100, num_subsets=100)
  assert sub.std > 0 and abs(sub.mean - full) < 4 * sub.std / math.sqrt(100) + 1e-3
  # Unbiased: two independent samples of one distribution give ~0 (within the same noise), unlike the shift.
  same = fid.kernel_inception_distance(big_a, rng.normal(size=(400, 6)), subset_size=100)
  assert abs(same.mean) < 4 * same.std / math.sqrt(100) + 1e-3 < full


def test_fid_rejects_bad_input():
  with pytest.raises(ValueError, match="at least 2"):
    fid.fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    fid.fid_from_features(np.zeros(4), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_psnr_against_numpy_and_skimage():
  a = RNG.uniform(size=(4, 9, 11, 3)).astype(np.float32)
  b = np.clip(a + RNG.normal(scale=0.1, size=a.shape), 0, 1).astype(np.float32)
  got = np.asarray(image_metrics.psnr(jnp.asarray(a), jnp.asarray(b)))
  expected = [skimage_metrics.peak_signal_noise_ratio(x.astype(np.float64), y.astype(np.float64), data_range=1.0)
              for x, y in zip(a, b)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reference_protocol_psnr_and_ssim_against_skimage():
  """The reference passes whole batches to skimage's PSNR and single images to its SSIM (section 4.1)."""
  rng = np.random.default_rng(5)
  n = 70  # two reference batches: 64 + 6
  originals = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
  x_hat = np.clip(originals / 127.5 - 1.0 + rng.normal(scale=0.15, size=originals.shape), -1.2, 1.2)
  x_hat = x_hat.astype(np.float32)
  mse, ssim = image_metrics.reference_protocol_metrics(jnp.asarray(originals), jnp.asarray(x_hat))
  # The reference's conversions, in float64: [-1, 1] -> [0, 1] clamped -> uint8 by truncation -> / 255.
  truncated = (np.clip((x_hat.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8) / 255.0
  real = originals / 255.0
  batches = [(0, 64), (64, 70)]
  expected_psnr = np.mean([skimage_metrics.peak_signal_noise_ratio(real[i:j], truncated[i:j]) for i, j in batches])
  assert image_metrics.pooled_psnr(np.asarray(mse)) == pytest.approx(expected_psnr, abs=1e-4)
  expected_ssim = [skimage_metrics.structural_similarity(x, y, data_range=1.0, channel_axis=-1)
                   for x, y in zip(real, truncated)]
  # float32 against float64: the (co)variances lose ~1e-7 to cancellation, against C2 = 9e-4 in the denominator.
  np.testing.assert_allclose(np.asarray(ssim), expected_ssim, atol=2e-5)


def test_ssim_of_smooth_images_and_identity():
  rng = np.random.default_rng(6)
  base = rng.uniform(size=(2, 12, 12, 1))
  smooth = (base + np.roll(base, 1, axis=1) + np.roll(base, 1, axis=2)) / 3.0
  other = np.clip(smooth + rng.normal(scale=0.05, size=smooth.shape), 0, 1)
  got = np.asarray(image_metrics.ssim(jnp.asarray(smooth, jnp.float32), jnp.asarray(other, jnp.float32)))
  expected = [skimage_metrics.structural_similarity(x[..., 0], y[..., 0], data_range=1.0)
              for x, y in zip(smooth, other)]
  np.testing.assert_allclose(got, expected, atol=2e-5)
  same = np.asarray(image_metrics.ssim(jnp.asarray(smooth, jnp.float32), jnp.asarray(smooth, jnp.float32)))
  np.testing.assert_allclose(same, 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="at least 7x7"):
    image_metrics.ssim(jnp.zeros((1, 6, 6, 3)), jnp.zeros((1, 6, 6, 3)))
  with pytest.raises(ValueError, match="same shape"):
    image_metrics.ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 9, 8, 3)))


def test_block_average_baseline_against_numpy():
  # The largest square grid with at most that many cells whose blocks tile the image.
  assert [image_metrics.block_baseline_cells(n, 32) for n in (64, 16, 50, 1, 1000, 1024)] == [8, 4, 4, 1, 16, 32]
  assert image_metrics.block_baseline_cells(256, 24) == 12
  images = np.random.default_rng(0).uniform(size=(2, 12, 12, 3))
  means = images.reshape(2, 3, 4, 3, 4, 3).mean(axis=(2, 4))
  expected = np.repeat(np.repeat(means, 4, axis=1), 4, axis=2)
  np.testing.assert_allclose(image_metrics.block_average(jnp.asarray(images, jnp.float32), 3), expected, atol=1e-6)
  with pytest.raises(ValueError, match="5 x 5 grid must tile the images, got 12 x 12"):
    image_metrics.block_average(jnp.asarray(images), 5)
  with pytest.raises(ValueError, match="must be positive, got 0 and 32"):
    image_metrics.block_baseline_cells(0, 32)


def test_kid_with_unequal_set_sizes_is_unbiased_over_subsets_and_seeded():
  """Subsets of min(N, M) features: with M < N the whole smaller set is in every subset, and the mean over subsets
  estimates the U-statistic MMD^2 of all the features (a random subset's mean over distinct pairs is unbiased for
  the mean over all distinct pairs)."""
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 0.4

  def k(x, y):
    return (x @ y.T / 4 + 1.0) ** 3

  n, m = len(a), len(b)
  xx, yy = k(a, a), k(b, b)
  full = ((xx.sum() - np.trace(xx)) / (n * (n - 1)) + (yy.sum() - np.trace(yy)) / (m * (m - 1))
          - 2.0 * k(a, b).mean())
  result = fid.kernel_inception_distance(a, b, num_subsets=400, subset_size=1000, seed=3)
  assert result.subset_size == 20 and result.std > 0
  # Only the a-subsets vary; their mean is within 4 standard errors (std / sqrt(400)) of its expectation.
  assert abs(result.mean - full) < 4 * result.std / math.sqrt(400)
  # Reproducible from its seed, and the seed matters.
  again = fid.kernel_inception_distance(a, b, num_subsets=400, subset_size=1000, seed=3)
  other = fid.kernel_inception_distance(a, b, num_subsets=400, subset_size=1000, seed=4)
  assert again == result and other.mean != result.mean


def test_psnr_caps_at_100_db():
  # MSE floored at 1e-10: identical images give 100 dB, per image and pooled (not inf, not another cap).
  a = jnp.asarray(RNG.uniform(size=(2, 8, 8, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(image_metrics.psnr(a, a)), [100.0, 100.0])
  assert image_metrics.pooled_psnr(np.zeros(3)) == pytest.approx(100.0, abs=1e-12)


def test_ssim_data_range_scales_the_constants():
  """Images in [0, 255] with data_range 255: C1 = (K1 L)^2 and C2 = (K2 L)^2 in the units of the images.

  Dark images of different brightness, so that C1 counts next to the local means (sqrt(C1) = 2.55) and C2 next
  to the local variances (sqrt(C2) = 7.65).
  """
  rng = np.random.default_rng(9)
  a = rng.uniform(0, 30, size=(2, 10, 10, 3))
  b = np.clip(0.5 * a + 3.0 + rng.normal(scale=4.0, size=a.shape), 0, 255)
  got = np.asarray(image_metrics.ssim(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), data_range=255.0))
  expected = [skimage_metrics.structural_similarity(x, y, data_range=255.0, channel_axis=-1) for x, y in zip(a, b)]
  # Moments and constants both scale with L^2, so the float32 error of the ratio is that of data range 1: 2e-5.
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_pixel_conversions_against_numpy():
  """pixels: uint8 -> [-1, 1]; [-1, 1] -> float pixels clipped to [0, 255]; -> uint8 rounded (pictures) or
  truncated (the reference's metrics)."""
  levels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  np.testing.assert_allclose(np.asarray(pixels.to_model_input(jnp.asarray(levels).reshape(1, 2, 1, 3))).ravel(),
                             levels / 127.5 - 1.0, rtol=0, atol=1e-7)  # float32 rounding of values <= 1
  # Values past both ends, and values whose pixel is 10.6 (rounds to 11, truncates to 10) and 200.2.
  x = np.array([-1.5, -1.0, 10.6 / 127.5 - 1.0, 200.2 / 127.5 - 1.0, 1.0, 1.7], np.float32)
  want = np.clip((x.astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)
  np.testing.assert_allclose(np.asarray(pixels.to_pixels(jnp.asarray(x))), want, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(pixels.to_uint8(x), [0, 0, 11, 200, 255, 255])
  np.testing.assert_array_equal(np.asarray(pixels.truncate_to_uint8(pixels.to_pixels(jnp.asarray(x)))),
                                [0, 0, 10, 200, 255, 255])
  # A bfloat16 model output is scaled in float32: in bfloat16, 200.2 would round to a whole level (its ulp is 1).
  x16 = jnp.asarray(x, jnp.bfloat16)
  got = pixels.to_pixels(x16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.clip((np.asarray(x16, np.float64) + 1.0) * 127.5, 0.0, 255.0),
                             rtol=0, atol=1e-4)


def _subset_kid(a, b, num_subsets, m, seed):
  """KID's subset procedure written out in float64: one generator seeded with `seed` draws m rows of a, then m
  rows of b, without replacement, per subset; per subset the unbiased MMD^2 with (x.y / d + 1)^3, by loops."""
  def k(x, y):
    return (np.dot(x, y) / a.shape[1] + 1.0) ** 3

  draw = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x, y = a[draw.choice(len(a), m, replace=False)], b[draw.choice(len(b), m, replace=False)]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    values.append(xx + yy - 2.0 * xy)
  return np.array(values)


def test_kid_spread_over_subsets_and_fid_and_kid_pass_the_seed():
  """The KID std is the population std (ddof 0, as torch-fidelity's) of the per-subset MMD^2s, and `fid_and_kid`
  returns FID, KID and that std for its own seed (with the default 100 subsets of min(1000, N, M) features).
  Unequal set sizes, so that the subsets differ and the seed matters."""
  rng = np.random.default_rng(10)
  a, b = rng.normal(size=(9, 3)), rng.normal(size=(7, 3)) * 1.3 + 0.4
  values = _subset_kid(a, b, num_subsets=5, m=4, seed=2)
  result = fid.kernel_inception_distance(a, b, num_subsets=5, subset_size=4, seed=2)
  assert result.subset_size == 4
  assert result.mean == pytest.approx(values.mean(), rel=1e-12)
  assert result.std == pytest.approx(np.std(values), rel=1e-12)  # ddof 1 would be 12% larger with 5 subsets
  values = _subset_kid(a, b, num_subsets=fid.KID_SUBSETS, m=7, seed=6)
  # pytorch-fid's FID formula, with scipy's general matrix square root (full-rank covariances: N > D).
  mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected_fid = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                  - 2.0 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
  scores = fid.fid_and_kid(a, b, seed=6)
  assert scores == pytest.approx({"fid": expected_fid, "kid": values.mean(), "kid_std": np.std(values)}, rel=1e-10)
  assert fid.fid_and_kid(a, b)["kid"] != scores["kid"]  # seed 0's subsets are other ones


def test_metric_inputs_are_checked():
  """Inputs the metrics would otherwise turn into a number: integer or non-finite features, KID subsets of one
  feature (no pair to average over: 0 / 0), a grid that tiles the height but not the width, float originals
  (the reference protocol divides them by 255 as if they were pixels)."""
  with pytest.raises(ValueError, match=r"must be a float array \[N, D\], got int64"):
    fid.fid_from_features(np.ones((5, 4), np.int64), np.zeros((5, 4)))
  features = np.random.default_rng(11).normal(size=(5, 4))
  features[3, 1] = np.nan
  with pytest.raises(ValueError, match="must be finite; 1 of its 5 feature vectors are not"):
    fid.kernel_inception_distance(np.zeros((5, 4)), features)
  with pytest.raises(ValueError, match="subset_size >= 2, got 100 and 1"):
    fid.kernel_inception_distance(np.zeros((5, 4)), np.ones((5, 4)), subset_size=1)
  with pytest.raises(ValueError, match="3 x 3 grid must tile the images, got 12 x 10"):
    image_metrics.block_average(np.zeros((1, 12, 10, 3)), 3)
  with pytest.raises(ValueError, match="must be uint8 pixels, got float32"):
    image_metrics.reference_protocol_metrics(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 3)))


def test_ssim_takes_images_exactly_the_window_size():
  # The smallest images SSIM takes are 7 x 7: one window, as skimage allows (win_size up to the shorter side).
  # Traced only, not compiled or run: the size check runs while tracing, and the value path is that of any size.
  image = jax.ShapeDtypeStruct((2, 7, 7, 3), jnp.float32)
  assert jax.eval_shape(image_metrics.ssim, image, image).shape == (2,)
