"""Random-access image sources for grain: image folders / tar archives, and prepared TFDS datasets.

Every source is a sequence (`__len__`, `__getitem__`) of records `{"key": str, "data": bytes | ndarray}`:
`data` holds the still-encoded file bytes (decoded later, in grain's reader threads or worker processes) or,
for the in-memory demo photos, a uint8 [H, W, 3] array. `key` names the record in logs (a relative path,
or "name/split[index]"). Sources are pickled into grain's worker processes, so they hold no open files
across a pickle.
"""
from __future__ import annotations

import os
import re
import tarfile
import threading

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _read_split_file(split_file: str) -> list[str]:
  """Relative paths listed in `split_file`: the first field of each line ("path", "path label", "path,label").

  Lines whose first field is not an image file name (CSV headers, blank lines, '#' comments) are ignored, so
  the Mini-ImageNet CSV split files (`filename,label` with a header) can be used as they are.
  """
  if not os.path.isfile(split_file):
    raise FileNotFoundError(f"split file {split_file!r} does not exist.")
  entries = []
  with open(split_file, encoding="utf-8") as f:
    for line in f:
      fields = re.split(r"[,\s]+", line.strip(), maxsplit=1)
      if fields[0] and not fields[0].startswith("#") and _is_image_name(fields[0]):
        entries.append(fields[0].replace(os.sep, "/"))
  if not entries:
    raise ValueError(f"split file {split_file!r} lists no image files ({', '.join(IMAGE_EXTENSIONS)}).")
  return entries


class ImageFolderSource:
  """The image files of a directory tree or of an uncompressed .tar archive, read in place.

  Files are ordered by relative path (so the order, and hence shuffling and sharding, is the same on every
  host). Class subfolders are just part of the path. Files with an image extension that fail to decode
  (truncated, empty, mislabelled) are found later, when they are decoded, and skipped there.

  Args:
    path: a directory, or a `.tar` archive (members are read with `os.pread` at their data offsets, so a
      50k-image archive needs no unpacking and is shared safely by reader threads).
    subfolder: keep only files under this relative folder (e.g. "train"); "" keeps all.
    split_file: optional list of relative paths (see `_read_split_file`) selecting and ordering the files;
      relative to `path`, not to `subfolder`.
  """

  def __init__(self, path: str, *, subfolder: str = "", split_file: str = ""):
    if not path:  # the folder configs leave data.path to the command line
      raise FileNotFoundError("image folder path is empty: set it, e.g. --config.data.path=DIR_OR_TAR.")
    if not os.path.exists(path):
      raise FileNotFoundError(f"image folder path {path!r} does not exist.")
    self._path = path
    self._fd = None
    self._fd_pid = None
    self._fd_lock = threading.Lock()
    if os.path.isdir(path):
      self._is_tar = False
      names = self._list_directory(path)
      offsets = sizes = None
    elif tarfile.is_tarfile(path):
      self._is_tar = True
      names, offsets, sizes = self._list_tar(path)
    else:
      raise ValueError(f"image folder path {path!r} is neither a directory nor a tar archive.")
    where = f"{path!r}"
    if subfolder:
      prefix = subfolder.strip("/") + "/"
      where += (f" under subfolder {subfolder!r} (the split's name; a split of every file is '', e.g. "
                "--config.data.train_split=)")
      keep = [i for i, n in enumerate(names) if n.startswith(prefix)]
    else:
      keep = list(range(len(names)))
    if split_file:
      where += f" listed in {split_file!r}"
      position = {names[i]: i for i in keep}
      wanted = _read_split_file(split_file)
      missing = [n for n in wanted if n not in position]
      if missing:
        raise ValueError(f"{len(missing)} of the {len(wanted)} files listed in split file {split_file!r} are not "
                         f"in {path!r}, e.g. {missing[:3]}; entries must be paths relative to {path!r}.")
      keep = [position[n] for n in wanted]
    if not keep:
      raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {where}.")
    self._names = [names[i] for i in keep]
    if self._is_tar:
      self._offsets = np.asarray(offsets, dtype=np.int64)[keep]
      self._sizes = np.asarray(sizes, dtype=np.int64)[keep]

  @staticmethod
  def _list_directory(path: str) -> list[str]:
    names = []
    for root, dirs, files in os.walk(path, followlinks=True):
      dirs.sort()
      rel_root = os.path.relpath(root, path)
      for name in files:
        if _is_image_name(name):
          names.append(name if rel_root == "." else os.path.join(rel_root, name).replace(os.sep, "/"))
    return sorted(names)

  @staticmethod
  def _list_tar(path: str) -> tuple[list[str], list[int], list[int]]:
    try:
      with tarfile.open(path, mode="r:") as archive:  # "r:" refuses compressed archives: they have no offsets.
        members = [m for m in archive.getmembers() if m.isfile() and _is_image_name(m.name)]
    except tarfile.ReadError as e:
      raise ValueError(f"cannot read {path!r} as an uncompressed tar archive ({e}); unpack a compressed archive "
                       "first, random access needs the plain .tar.") from e
    members.sort(key=lambda m: m.name)
    # Archives made with `tar -C dir .` prefix every member with "./"; keys are relative paths without it.
    names = [m.name[2:] if m.name.startswith("./") else m.name for m in members]
    return names, [m.offset_data for m in members], [m.size for m in members]

  def __len__(self) -> int:
    return len(self._names)

  @property
  def names(self) -> list[str]:
    """The images' paths relative to the folder or tar, in record order."""
    return list(self._names)

  def _tar_fd(self) -> int:
    # One descriptor per process, opened on first use: grain's worker processes receive a pickled copy.
    with self._fd_lock:
      if self._fd is None or self._fd_pid != os.getpid():
        self._fd = os.open(self._path, os.O_RDONLY)
        self._fd_pid = os.getpid()
      return self._fd

  def __getitem__(self, index: int) -> dict:
    name = self._names[index]
    if self._is_tar:
      data = os.pread(self._tar_fd(), int(self._sizes[index]), int(self._offsets[index]))
    else:
      with open(os.path.join(self._path, name), "rb") as f:
        data = f.read()
    return {"key": name, "data": data}

  def __del__(self, _close=os.close, _getpid=os.getpid):
    # The functions are bound as defaults because module globals may already be gone at interpreter exit.
    if getattr(self, "_fd", None) is not None and self._fd_pid == _getpid():
      _close(self._fd)

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_fd=None, _fd_pid=None, _fd_lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fd_lock = threading.Lock()

  def __repr__(self) -> str:
    return f"ImageFolderSource(path={self._path!r}, num_images={len(self)})"


def prepared_tfds_builder(name: str, data_dir: str | None = None):
  """The TFDS builder of dataset `name`, which must be prepared in `data_dir` (default: TFDS's own)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when used)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # The first line says what is wrong; the rest of TFDS's message lists every dataset it knows.
    raise ValueError(f"unknown TFDS dataset {name!r} (data_dir={data_dir!r}): {str(e).splitlines()[0]}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {os.fspath(builder.data_dir)!r}. Prepare it as ArrayRecord "
        f"first, e.g. `tfds build {name} --file_format=array_record` (see docs/data.md).")
  return builder


def tfds_split_size(name: str, split: str, data_dir: str | None = None) -> int:
  """The number of records in a split (slices such as "train[:90%]" included) of a prepared TFDS dataset,
  from the builder's info, without opening its files."""
  return prepared_tfds_builder(name, data_dir).info.splits[split].num_examples


class TfdsImageSource:
  """The "image" feature of a prepared TFDS dataset, via `tfds.data_source` (ArrayRecord, no TensorFlow).

  Images are handed on still encoded (`tfds.decode.SkipDecoding`) so that they go through the same decoder,
  conversions and corrupt-file handling as image folders.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when used)

    builder = prepared_tfds_builder(name, data_dir)
    if "image" not in builder.info.features:
      raise ValueError(f"TFDS dataset {name!r} has no 'image' feature; it has {sorted(builder.info.features)}.")
    self._source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    self._prefix = f"{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    file_name = record.get("file_name")
    key = file_name.decode() if isinstance(file_name, bytes) else f"{self._prefix}[{index}]"
    return {"key": key, "data": record["image"]}

  def __repr__(self) -> str:
    return f"TfdsImageSource({self._prefix!r}, num_images={len(self)})"
