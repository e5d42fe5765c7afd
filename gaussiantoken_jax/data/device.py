"""The device side of the input pipeline: assembling global batches and scaling uint8 pixels to [-1, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_global_array(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Turns this process's numpy batch into global `jax.Array`s laid out by `sharding`.

  Every process passes its own local batch (the same shapes everywhere); the global batch is their
  concatenation along axis 0, in process order (`jax.make_array_from_process_local_data`).

  Args:
    batch: a dict of NumPy arrays sharing the leading (local batch) dimension, e.g. {"image", "mask"}.
    sharding: how to lay out each global array, typically `NamedSharding(mesh, P("data"))`; its spec applies
      to the leading axes, the rest are replicated.
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


def to_model_input(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] pixels -> float32 in [-1, 1] (x / 127.5 - 1); meant to run inside the jitted step."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"`images` must have shape [B, H, W, 3], got {tuple(images.shape)}.")
  if images.dtype != jnp.uint8:
    raise ValueError(f"`images` must have dtype uint8, got {images.dtype}.")
  # Centre first: x / 127.5 - 1 compiles to x * float32(1 / 127.5) - 1, which gives 1.0000001 for 255, while
  # (x - 127.5) * float32(1 / 127.5) rounds to exactly -1 and 1 at the ends.
  return (jnp.asarray(images).astype(jnp.float32) - 127.5) / 127.5
