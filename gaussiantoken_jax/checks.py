"""Argument checks shared by the public functions: clear ValueErrors naming the argument, expected and got."""
from __future__ import annotations

import numbers

import jax.numpy as jnp


def check_float_array(where: str, name: str, x, layout: str, rank: int, last_dim: int | None = None) -> None:
  """Raises ValueError unless `x` is a floating array of the given rank (and last dimension)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{where}: `{name}` must be an array of shape {layout}, got {type(x).__name__}.")
  if x.ndim != rank or (last_dim is not None and x.shape[-1] != last_dim):
    raise ValueError(f"{where}: `{name}` must have shape {layout}, got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{where}: `{name}` must be a floating-point array, got dtype {x.dtype}.")


def check_nhwc(where: str, name: str, x, *, channels: int | None = None, spatial_divisor: int = 1) -> None:
  """Raises ValueError unless `x` is a floating-point [B, H, W, C] array with the given C and H, W multiples."""
  check_float_array(where, name, x, f"[B, H, W, {channels if channels is not None else 'C'}] (NHWC)", 4,
                    last_dim=channels)
  height, width = x.shape[1:3]
  if height % spatial_divisor or width % spatial_divisor:
    raise ValueError(f"{where}: the height and width of `{name}` must be multiples of {spatial_divisor}, got "
                     f"shape {tuple(x.shape)}.")


def check_positive_int(where: str, name: str, value) -> None:
  """Raises ValueError unless `value` is an integer >= 1: a Python or NumPy integer, not a bool."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{where}: `{name}` must be a positive int, got {value!r}.")


def check_non_negative_int(where: str, name: str, value) -> None:
  """Raises ValueError unless `value` is an integer >= 0: a Python or NumPy integer, not a bool."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{where}: `{name}` must be a non-negative int, got {value!r}.")
