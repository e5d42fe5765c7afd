"""FID and KID from Inception features: statistics on the host in float64.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to two feature sets,

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b; with symmetric eigendecompositions only, it
needs no complex matrix square root and no epsilon retry (pytorch-fid's scipy `sqrtm` route gives the same
value where it converges). With no more images than feature dimensions, as in every evaluation of fewer than
2048 images, `fid_from_features` takes a low-rank route instead (its docstring).

KID (Binkowski et al. 2018) is the unbiased MMD^2 estimate with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random subsets of `subset_size` features from each set.
Unlike FID it has no bias in the number of images, so it is the number to compare between small evaluations
(FID over a few hundred images is dominated by its bias; see docs/evaluation.md).

`FeatureAccumulator` keeps the features of a long evaluation on the device batch by batch (no host round trip
per batch) and moves them to the host once, at the end.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def _check_features(where: str, name: str, x) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{where}: `{name}` must be a float array [N, D], got {x.dtype} of shape {x.shape}.")
  if x.shape[0] < 2:
    raise ValueError(f"{where}: `{name}` needs at least 2 feature vectors, got {x.shape[0]}.")
  if not np.all(np.isfinite(x)):
    rows = int(np.sum(~np.all(np.isfinite(x), axis=1)))
    raise ValueError(f"{where}: `{name}` must be finite; {rows} of its {x.shape[0]} feature vectors are not.")
  return x.astype(np.float64)


class GaussianStats(NamedTuple):
  """Mean [D] and (unbiased, N - 1) covariance [D, D] of a feature set, float64, and its size."""
  mean: np.ndarray
  cov: np.ndarray
  count: int


def gaussian_stats(features) -> GaussianStats:
  """Float64 mean and covariance of features [N, D] (N >= 2)."""
  x = _check_features("gaussian_stats", "features", features)
  return GaussianStats(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False), count=x.shape[0])


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The PSD square root of a symmetric matrix (negative rounding-error eigenvalues clipped to 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
  """Squared Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b) (float64)."""
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  d = mean_a.shape[0] if mean_a.ndim == 1 else -1
  for name, value, shape in (("mean_a", mean_a, (d,)), ("mean_b", mean_b, (d,)), ("cov_a", cov_a, (d, d)),
                             ("cov_b", cov_b, (d, d))):
    if d < 1 or value.shape != shape:
      raise ValueError(f"frechet_distance: `{name}` must have shape {shape} (means [D], covariances [D, D]), "
                       f"got {value.shape}.")
  sqrt_a = _symmetric_sqrt(cov_a)
  cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
  trace_sqrt = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
  difference = mean_a - mean_b
  return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def fid_from_features(features_a, features_b) -> float:
  """FID between two feature sets [N, D] and [M, D].

  With fewer samples than dimensions (min(N, M) <= D) the covariances are low-rank, S_a = A^T A / (N - 1) with
  A the centred features, and Tr((S_a S_b)^(1/2)) is the sum of the singular values of A B^T / sqrt((N-1)(M-1))
  (the nonzero eigenvalues of S_a S_b are those of A B^T B A^T / ((N-1)(M-1))): an N x M problem instead of
  two D x D eigendecompositions, and free of the square roots of rounding-level null eigenvalues.
  """
  a = _check_features("fid_from_features", "features_a", features_a)
  b = _check_features("fid_from_features", "features_b", features_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"fid_from_features: feature sizes differ: {a.shape[1]} and {b.shape[1]}.")
  if min(a.shape[0], b.shape[0]) > a.shape[1]:
    stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
    return frechet_distance(stats_a.mean, stats_a.cov, stats_b.mean, stats_b.cov)
  centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
  norm_a, norm_b = a.shape[0] - 1, b.shape[0] - 1
  trace_sqrt = np.sum(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)) / np.sqrt(norm_a * norm_b)
  difference = a.mean(axis=0) - b.mean(axis=0)
  return float(difference @ difference + np.sum(centred_a ** 2) / norm_a + np.sum(centred_b ** 2) / norm_b
               - 2.0 * trace_sqrt)


class KID(NamedTuple):
  mean: float
  std: float
  subset_size: int


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> KID:
  """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std over random subsets.

  Each subset draws min(subset_size, N, M) features from each set without replacement (seeded, so the value is
  reproducible); when that is all of both sets, one subset is computed (std 0).
  """
  a = _check_features("kernel_inception_distance", "features_a", features_a)
  b = _check_features("kernel_inception_distance", "features_b", features_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"kernel_inception_distance: feature sizes differ: {a.shape[1]} and {b.shape[1]}.")
  if not isinstance(num_subsets, int) or num_subsets < 1 or not isinstance(subset_size, int) or subset_size < 2:
    raise ValueError(f"kernel_inception_distance: need num_subsets >= 1 and subset_size >= 2, got {num_subsets} "
                     f"and {subset_size}.")
  m = min(subset_size, a.shape[0], b.shape[0])
  if m == a.shape[0] == b.shape[0]:
    num_subsets = 1  # every subset would be the whole of both sets
  dim = a.shape[1]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = a[rng.choice(a.shape[0], m, replace=False)]
    y = b[rng.choice(b.shape[0], m, replace=False)]
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    values.append(within - 2.0 * k_xy.mean())
  return KID(mean=float(np.mean(values)), std=float(np.std(values)), subset_size=m)


class FeatureAccumulator:
  """Collects per-batch features [B, D] with masks [B] on the device; `result()` gathers them to the host.

  Nothing is fetched until `result()`, so adding a batch never waits for the device. Every process of a
  multi-process run must call `result()` (it all-gathers).
  """

  def __init__(self):
    self._features: list[jax.Array] = []
    self._masks: list[jax.Array] = []

  def add(self, features: jax.Array, mask: jax.Array) -> None:
    if features.ndim != 2 or mask.shape != features.shape[:1]:
      raise ValueError(f"FeatureAccumulator.add: need features [B, D] and mask [B], got {tuple(features.shape)} "
                       f"and {tuple(mask.shape)}.")
    self._features.append(features)
    self._masks.append(mask)

  def __len__(self) -> int:
    return len(self._features)

  def result(self) -> np.ndarray:
    """float32 [N, D]: the features of the unmasked rows, in the order they were added."""
    if not self._features:
      raise ValueError("FeatureAccumulator.result: no batch was added.")
    features, masks = multihost_utils.process_allgather((self._features, self._masks), tiled=True)
    return np.concatenate([np.asarray(f)[np.asarray(m, bool)] for f, m in zip(features, masks)])


def fid_and_kid(features_a, features_b, *, seed: int = 0) -> dict[str, float]:
  """{"fid", "kid", "kid_std"} between two feature sets; NaN for a set of fewer than 2 features."""
  if min(len(features_a), len(features_b)) < 2:
    return {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
  kid = kernel_inception_distance(features_a, features_b, seed=seed)
  return {"fid": fid_from_features(features_a, features_b), "kid": kid.mean, "kid_std": kid.std}
