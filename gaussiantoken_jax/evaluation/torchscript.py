"""Reads the float32 tensors of a TorchScript archive with numpy: no torch, no unrestricted unpickling.

A TorchScript file (`torch.jit.save`) is a zip holding `<prefix>/data.pkl`, a pickle of the module tree, and
one raw little-endian storage per tensor at `<prefix>/data/<key>`. In the pickle, modules are objects of
classes named `__torch__.<module path>.<Class>` whose state is a dict of attributes, and each tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` with the storage a persistent id
("storage", <type>, key, location, numel).

`read_torchscript_tensors` unpickles `data.pkl` with `weights.RestrictedUnpickler`: the `__torch__.*` classes
become plain records that only keep their state, tensors are rebuilt from the storages as numpy arrays, and
every other global (anything that could run code) is refused. The result maps dotted attribute paths
("net.layers.conv.weight") to arrays; scalar attributes (strides, paddings, flags) are not returned.
"""
from __future__ import annotations

import collections
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from gaussiantoken_jax import weights

_TORCHSCRIPT_CLASS_PREFIX = "__torch__."
# Storage types this reader understands, with their numpy dtype (everything in the FID network is float32).
_STORAGE_DTYPES = {"FloatStorage": np.dtype("<f4")}


class _ModuleRecord:
  """Stands in for a TorchScript module class: keeps the pickled attribute dict, runs nothing."""

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, Mapping):
      raise ValueError(f"TorchScript module state must be a dict of attributes, got {type(state).__name__}.")
    self.attributes = dict(state)


class _StorageType:
  """Marks a storage class (e.g. torch.FloatStorage) by name; the dtype is looked up when it is read."""

  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  """numpy version of torch._utils._rebuild_tensor_v2: a strided view of the storage, copied."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise ValueError(f"TorchScript tensor with invalid geometry: offset {offset}, size {size}, stride {stride}.")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if last >= storage.size:
    raise ValueError(f"TorchScript tensor of size {size} and stride {stride} at offset {offset} runs past its "
                     f"storage of {storage.size} elements.")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
  return np.array(view)


class _TorchScriptUnpickler(weights.RestrictedUnpickler):
  """`data.pkl` reader: module classes -> `_ModuleRecord`, storages read from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file, {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "build_intlist"): list,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    })
    self._archive = archive
    self._prefix = prefix
    self._record_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith(_TORCHSCRIPT_CLASS_PREFIX):
      qualified = f"{module}.{name}"
      if qualified not in self._record_classes:
        self._record_classes[qualified] = type(name, (_ModuleRecord,), {"torchscript_class": qualified})
      return self._record_classes[qualified]
    return super().find_class(module, name)

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise ValueError(f"Unsupported TorchScript persistent id {pid!r}; expected ('storage', FloatStorage, key, "
                       "location, numel).")
    _, storage_type, key, _, numel = pid
    raw = self._archive.read(f"{self._prefix}/data/{key}")
    dtype = _STORAGE_DTYPES[storage_type.name]
    if len(raw) != numel * dtype.itemsize:
      raise ValueError(f"TorchScript storage {key!r} holds {len(raw)} bytes, expected {numel} x {dtype.itemsize}.")
    return np.frombuffer(raw, dtype)


def _collect_tensors(record: _ModuleRecord, prefix: str, out: dict[str, np.ndarray]) -> None:
  for name, value in record.attributes.items():
    if isinstance(value, _ModuleRecord):
      _collect_tensors(value, f"{prefix}{name}.", out)
    elif isinstance(value, np.ndarray):
      out[f"{prefix}{name}"] = value


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of the TorchScript module saved at `path`: {"net.layers.conv.weight": float32 array, ...}."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"read_torchscript_tensors: {os.fspath(path)!r} is not a TorchScript archive (not a zip).")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"read_torchscript_tensors: expected one '<prefix>/data.pkl' in {os.fspath(path)!r}, got "
                       f"{pickles}.")
    prefix = pickles[0].split("/")[0]
    with archive.open(pickles[0]) as f:
      root = _TorchScriptUnpickler(f, archive, prefix).load()
  if not isinstance(root, _ModuleRecord):
    raise ValueError(f"read_torchscript_tensors: the root of {os.fspath(path)!r} is a {type(root).__name__}, "
                     "not a TorchScript module.")
  tensors: dict[str, np.ndarray] = {}
  _collect_tensors(root, "", tensors)
  return tensors
