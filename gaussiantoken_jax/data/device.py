"""The device side of the input pipeline: assembling global batches (the uint8 -> [-1, 1] scaling is
`gaussiantoken_jax.pixels.to_model_input`, run inside the jitted steps)."""
from __future__ import annotations

import jax
import numpy as np


def to_global_array(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Turns this process's numpy batch into global `jax.Array`s laid out by `sharding`.

  Every process passes its own local batch (the same shapes everywhere); the global batch is their
  concatenation along axis 0, in process order (`jax.make_array_from_process_local_data`).

  Args:
    batch: a dict of NumPy arrays sharing the leading (local batch) dimension, e.g. {"image", "mask"}.
    sharding: how to lay out each global array, typically `train.sharding.batch_sharding(mesh)` (the batch
      over both mesh axes); its spec applies to the leading axes, the rest are replicated.
  """
  if not isinstance(sharding, jax.sharding.Sharding):
    raise ValueError(f"`sharding` must be a jax.sharding.Sharding, got {type(sharding).__name__}.")
  if not isinstance(batch, dict) or not batch:
    raise ValueError(f"`batch` must be a non-empty dict of NumPy arrays, got {type(batch).__name__}.")
  leading = {}
  for name, value in batch.items():
    if not isinstance(value, np.ndarray) or value.ndim < 1:
      raise ValueError(f"`batch[{name!r}]` must be a NumPy array with a batch axis, got "
                       f"{type(value).__name__} of shape {getattr(value, 'shape', None)}.")
    leading[name] = value.shape[0]
  if len(set(leading.values())) != 1:
    raise ValueError(f"the arrays of `batch` must share their leading (batch) size, got {leading}.")
  return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in batch.items()}

