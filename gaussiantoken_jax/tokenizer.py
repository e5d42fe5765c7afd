"""The downstream API: a trained tokenizer restored from its checkpoint, and the tokens it makes.

    tokenizer = GaussianTokenizer.from_checkpoint("/tmp/gt_demo")   # a workdir, its checkpoints/ or a step dir
    tokens = tokenizer.encode(images)        # uint8 [B,H,W,3] or float in [-1, 1] -> Tokens
    tokens = tokenizer.encode(images, fit_geometry_steps=50)   # geometry refined against each image (below)
    tokens.save("tokens.npz"); tokens = Tokens.load("tokens.npz")
    images_hat = tokenizer.decode(tokens)    # float32 [B,H,W,3] in [-1, 1]

The config comes from the checkpoint; only the generator's (EMA) parameters and model state are read
(`restore.restore_model`). `encode` and `decode` check their arguments on the host (shapes, dtypes, and,
for concrete arrays, values) and run one jitted function each (`reconstruct` is the two in turn); host arrays
whose batch is a multiple of the mesh's device count are split over the mesh's devices. Inside a jitted function
of one's own, either call the methods (the parameters become constants of that function) or the pure forms with
the parameters as an argument:

    @jax.jit
    def step(variables, images):
      tokens = tokenizer.encode_fn(variables, images)
      return tokenizer.decode_fn(variables, tokens)
    step(tokenizer.variables, images)

With a batch split over several devices, jit `sharding.traced_on(tokenizer.mesh, step)` instead (or trace under
`jax.set_mesh`), so that the Pallas splat on GPU / TPU runs each device's own images rather than the whole
batch on every device (`gaussiantoken_jax.splatting`); the methods do this themselves.

`fit_geometry_steps=N` refines each image's Gaussian geometry against the image itself after the embedder has
predicted it: N Adam steps on the image's L1 reconstruction error through the decoder, the codes fixed
(`geometry_fit`). The tokens keep their format and size; decoding is unchanged. It costs N decoder forward and
backward passes per batch, and is what the continuous geometry allows and a codebook index does not
(docs/tokenizer.md has the measured gain).

The plain-VQ baseline (`model.type="vq"`) restores through the same class; its tokens carry indices only (the
geometry fields are None), one per cell of its code grid in row-major order.
"""
from __future__ import annotations

import numbers
import os
import zipfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from gaussiantoken_jax import geometry_fit, pixels, restore, xla_options
from gaussiantoken_jax.checks import check_non_negative_int
from gaussiantoken_jax.train import sharding

_GEOMETRY = ("means", "rotations", "scales")
# The geometry fields' shapes after [B, K].
_GEOMETRY_TAIL = {"means": (2,), "rotations": (), "scales": (2,)}


def read_npz(path: epath.PathLike) -> dict[str, np.ndarray]:
  """The arrays of an .npz file; ValueError, naming the path, for anything else (truncated, .npy, text ...)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No such file {path}.")
  with path.open("rb") as f:
    # np.load would read anything else as an .npy array or a pickle, and its errors would say so.
    if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip file's first entry, or an empty zip
      raise ValueError(f"{path} is not an .npz archive: it does not start as a zip file does.")
    f.seek(0)
    try:
      with np.load(f) as npz:
        return {name: npz[name] for name in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
      raise ValueError(f"{path} is not a readable .npz archive ({type(error).__name__}: {error}).") from None


@flax.struct.dataclass
class Tokens:
  """A batch of tokens: a pytree (passes through jax.jit, jax.tree.map, device_put).

  Attributes:
    indices: int32 [B, K] codebook indices.
    means: float32 [B, K, 2] Gaussian centres in [-1, 1] (x = column, y = row); None for the VQ baseline.
    rotations: float32 [B, K] angles in radians; None for the VQ baseline.
    scales: float32 [B, K, 2] standard deviations in feature-map pixels; None for the VQ baseline.
  """
  indices: Any
  means: Any = None
  rotations: Any = None
  scales: Any = None

  @property
  def has_geometry(self) -> bool:
    return self.means is not None

  def save(self, path: epath.PathLike) -> None:
    """Writes the arrays to an uncompressed `.npz` at exactly `path` (bit-exact; geometry only if present)."""
    arrays = {name: np.asarray(jax.device_get(value)) for name, value in self._fields().items() if value is not None}
    with epath.Path(path).open("wb") as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: epath.PathLike) -> Tokens:
    """Reads what `save` wrote, as host numpy arrays."""
    arrays = read_npz(path)
    unknown = sorted(set(arrays) - {"indices", *_GEOMETRY})
    if "indices" not in arrays or unknown:
      raise ValueError(f"{path} is not a tokens file: expected arrays 'indices' and optionally {list(_GEOMETRY)}, "
                       f"got {sorted(arrays)}.")
    return cls(**arrays)

  def _fields(self) -> dict[str, Any]:
    return {"indices": self.indices, **{name: getattr(self, name) for name in _GEOMETRY}}


@jax.jit
def _value_summary(x):
  """(min, max, any NaN) of a float device array, in one small computation."""
  return jnp.nanmin(x), jnp.nanmax(x), jnp.any(jnp.isnan(x))


class GaussianTokenizer:
  """A trained GaussianToken (or plain-VQ baseline) generator: images <-> `Tokens`.

  Build it with `from_checkpoint`. Attributes: `config` (the run's), `step` (the checkpoint's), `model`
  (the unbound Flax module), `variables` ({"params", **model_state}, on `mesh`), `mesh`.
  """

  def __init__(self, restored: restore.RestoredModel):
    self.config: ml_collections.ConfigDict = restored.config
    self.step: int = restored.step
    self.model = restored.model
    self.mesh: Mesh = restored.steps.mesh
    self.variables = {"params": restored.params, **restored.model_state}
    # Also callable inside a caller's jit (xla_options.jit).
    conv_dtype = self.config.model.conv_dtype
    self._encode = xla_options.jit(sharding.traced_on(self.mesh, self.encode_fn), self.mesh, conv_dtype,
                                   static_argnames=("fit_geometry_steps", "fit_learning_rate"))
    self._decode = xla_options.jit(sharding.traced_on(self.mesh, self.decode_fn), self.mesh, conv_dtype)

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, step: int | None = None, use_ema: bool = True,
                      mesh: Mesh | None = None) -> GaussianTokenizer:
    """Restores a tokenizer from a training workdir, its `checkpoints` directory, or one step directory.

    Args:
      path: where the checkpoint is.
      step: the checkpoint step; None for the newest complete one (or the step of a step directory).
      use_ema: the EMA parameters (what evaluation uses) or, if False, the raw trained ones.
      mesh: the device mesh to put the parameters on and split batches over, with axes ("data", "fsdp") of
        type Auto (`train.sharding.make_mesh`); default the run's mesh section on all devices.

    Raises FileNotFoundError (naming the path and, for a missing step, the available ones) when there is no
    checkpoint; ValueError when the checkpoint's parameters do not fit its config's model.
    """
    if not isinstance(path, (str, os.PathLike)):
      raise ValueError(f"`path` must be a path (str or os.PathLike), got {type(path).__name__}.")
    if mesh is not None and not isinstance(mesh, Mesh):
      raise ValueError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
    if step is not None:
      check_non_negative_int("from_checkpoint", "step", step)
    return cls(restore.restore_model(path, step, use_ema=use_ema, mesh=mesh))

  # --- What the tokens look like.
  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  @property
  def model_type(self) -> str:
    """"gaussiantoken" or "vq"."""
    return self.config.model.type

  @property
  def has_geometry(self) -> bool:
    """Whether the tokens carry Gaussians' geometry (False for the VQ baseline)."""
    return self.model_type != "vq"

  @property
  def num_tokens(self) -> int:
    """K, tokens per image: the number of Gaussians, or the VQ baseline's grid cells."""
    return self.config.model.num_gaussians if self.has_geometry else int(np.prod(self.model.feature_shape))

  @property
  def codebook_size(self) -> int:
    return self.config.model.codebook_size

  # --- Pure forms (traceable; `variables` as an argument).
  def encode_fn(self, variables, images, fit_geometry_steps: int = 0,
                fit_learning_rate: float = geometry_fit.LEARNING_RATE) -> Tokens:
    """Pure encode: `variables` ({"params", **model_state}) and images -> Tokens. Checks shapes and dtypes
    (not values: they may be traced). `fit_geometry_steps` > 0 refines the geometry against the images
    (module docstring; GaussianToken only)."""
    self._check_images(images, check_values=False)
    self.check_fit(fit_geometry_steps, fit_learning_rate)
    x = pixels.to_model_input(images) if images.dtype == jnp.uint8 else jnp.asarray(images, jnp.float32)
    indices, gaussians = self.model.apply(variables, x, method="encode_tokens")
    indices = indices.astype(jnp.int32)
    if gaussians is None:
      return Tokens(indices=indices)
    if fit_geometry_steps:
      gaussians = geometry_fit.fit_gaussians(self.model, variables, gaussians, x, steps=fit_geometry_steps,
                                             learning_rate=fit_learning_rate)
    return Tokens(indices=indices, means=gaussians.means, rotations=gaussians.rotations, scales=gaussians.scales)

  def decode_fn(self, variables, tokens: Tokens):
    """Pure decode: `variables` and Tokens -> float32 [B,H,W,3] clipped to [-1, 1] (as evaluation clips)."""
    self._check_tokens(tokens, check_values=False)
    geometry = {name: getattr(tokens, name) for name in _GEOMETRY}
    if self.has_geometry:
      geometry = {name: jnp.asarray(value, jnp.float32) for name, value in geometry.items()}
    reconstruction = self.model.apply(variables, jnp.asarray(tokens.indices, jnp.int32), **geometry,
                                      method="decode_indices")
    return jnp.clip(reconstruction.astype(jnp.float32), -1.0, 1.0)

  # --- Checked, jitted entry points.
  def encode(self, images, fit_geometry_steps: int = 0,
             fit_learning_rate: float = geometry_fit.LEARNING_RATE) -> Tokens:
    """uint8 [B,H,W,3] pixels or float [B,H,W,3] in [-1, 1] (H = W = `image_size`) -> Tokens (on the devices);
    `fit_geometry_steps` > 0 refines the geometry against the images (module docstring)."""
    self._check_images(images, check_values=True)
    self.check_fit(fit_geometry_steps, fit_learning_rate)
    # Python scalars: jit keys its cache on the static arguments, and NumPy ones would compile again.
    return self._encode(self.variables, self._to_devices(images), fit_geometry_steps=int(fit_geometry_steps),
                        fit_learning_rate=float(fit_learning_rate))

  def decode(self, tokens: Tokens):
    """Tokens (as `encode` makes them, or edited, or loaded) -> float32 [B,H,W,3] in [-1, 1]."""
    self._check_tokens(tokens, check_values=True)
    return self._decode(self.variables, jax.tree.map(self._to_devices, tokens))

  def reconstruct(self, images, fit_geometry_steps: int = 0, fit_learning_rate: float = geometry_fit.LEARNING_RATE):
    """decode(encode(images, ...))."""
    return self.decode(self.encode(images, fit_geometry_steps, fit_learning_rate))

  def _to_devices(self, x):
    """A host array whose batch is a multiple of the mesh's device count, split over the mesh; others as they are."""
    if isinstance(x, np.ndarray) and x.ndim and x.shape[0] % self.mesh.size == 0:
      return jax.device_put(x, sharding.batch_sharding(self.mesh))
    return x

  # --- Argument checks (ValueError naming what was expected and what was received).
  def _check_images(self, images, *, check_values: bool) -> None:
    where, size = "GaussianTokenizer.encode", self.image_size
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
      raise ValueError(f"{where}: `images` must be an array of shape [B, {size}, {size}, 3], got "
                       f"{type(images).__name__}.")
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"{where}: `images` must have shape [B, {size}, {size}, 3] (NHWC at the trained image size, "
                       f"3 channels), got shape {tuple(images.shape)}.")
    dtype = jnp.dtype(images.dtype)
    if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{where}: `images` must be uint8 (0..255) or floating point in [-1, 1], got dtype {dtype}.")
    if not check_values or dtype == jnp.uint8 or xla_options.is_traced(images) or images.size == 0:
      return
    if isinstance(images, np.ndarray):
      low, high, has_nan = np.nanmin(images), np.nanmax(images), np.isnan(images).any()
    else:
      low, high, has_nan = jax.device_get(_value_summary(images))
    if has_nan:
      raise ValueError(f"{where}: `images` contains NaN.")
    if low < -1.0 or high > 1.0:
      raise ValueError(f"{where}: float `images` must lie in [-1, 1] (uint8 pixels are scaled by the tokenizer), "
                       f"got values in [{float(low):g}, {float(high):g}].")

  def check_fit(self, steps, learning_rate=geometry_fit.LEARNING_RATE) -> None:
    """Raises ValueError unless `encode` accepts these `fit_geometry_steps` and `fit_learning_rate` (a command
    checks them before it starts a long run)."""
    where = "GaussianTokenizer.encode"
    check_non_negative_int(where, "fit_geometry_steps", steps)
    if steps and not self.has_geometry:
      raise ValueError(f"{where}: `fit_geometry_steps`={steps}, but this plain-VQ baseline's tokens have no geometry "
                       "to fit.")
    if (not isinstance(learning_rate, numbers.Real) or isinstance(learning_rate, bool)
        or not 0 < learning_rate < float("inf")):  # NaN fails too
      raise ValueError(f"{where}: `fit_learning_rate` must be a positive finite float, got {learning_rate!r}.")

  def _check_tokens(self, tokens, *, check_values: bool) -> None:
    where, k = "GaussianTokenizer.decode", self.num_tokens
    if not isinstance(tokens, Tokens):
      raise ValueError(f"{where}: `tokens` must be a Tokens, got {type(tokens).__name__}.")
    indices = tokens.indices
    if not hasattr(indices, "dtype") or not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError(f"{where}: `tokens.indices` must be an integer array, got "
                       f"{getattr(indices, 'dtype', type(indices).__name__)}.")
    if indices.ndim != 2 or indices.shape[1] != k:
      raise ValueError(f"{where}: `tokens.indices` must have shape [B, {k}] ({k} tokens per image), got shape "
                       f"{tuple(indices.shape)}.")
    batch = indices.shape[0]
    if not self.has_geometry:
      given = [name for name in _GEOMETRY if getattr(tokens, name) is not None]
      if given:
        raise ValueError(f"{where}: this is a plain-VQ baseline, whose tokens are indices only; got {given}.")
    for name in _GEOMETRY if self.has_geometry else ():
      value, expected = getattr(tokens, name), (batch, k, *_GEOMETRY_TAIL[name])
      if value is None or not hasattr(value, "shape"):
        raise ValueError(f"{where}: `tokens.{name}` must be a float array of shape {list(expected)}, got "
                         f"{type(value).__name__}.")
      if tuple(value.shape) != expected or not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(f"{where}: `tokens.{name}` must be a float array of shape {list(expected)} (B and K as "
                         f"in `tokens.indices`), got {value.dtype} of shape {tuple(value.shape)}.")
    if check_values and not xla_options.is_traced(indices) and indices.size:
      geometry = _GEOMETRY if self.has_geometry else ()
      # One trip to the host for all of them; non-finite geometry (edited or damaged tokens) would decode silently.
      low, high, *non_finite = (int(v) for v in jax.device_get(
          (indices.min(), indices.max(), *(jnp.sum(~jnp.isfinite(getattr(tokens, name))) for name in geometry))))
      if low < 0 or high >= self.codebook_size:
        raise ValueError(f"{where}: `tokens.indices` must lie in [0, {self.codebook_size}) (the codebook size), "
                         f"got values in [{low}, {high}].")
      for name, bad in zip(geometry, non_finite):
        if bad:
          raise ValueError(f"{where}: `tokens.{name}` must be finite, got {bad} NaN or Inf values.")
