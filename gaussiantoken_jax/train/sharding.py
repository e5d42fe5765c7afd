"""Device mesh, batch and parameter shardings (the train state is created in them: `train.step.Steps.init`).

One mesh with the axes ("data", "fsdp") serves every scale: 1 CPU, 8 devices, many hosts. The batch is
split over all devices (both axes); parameters are replicated, except that with fsdp > 1 every weight of at
least `min_weight_size` elements is split along its largest dimension divisible by the fsdp size (the
big_vision "fsdp" rule). XLA's SPMD partitioner then inserts the all-gathers and reduce-scatters.

The mesh axes are `AxisType.Auto`: `jax.make_mesh` in JAX 0.10 makes Explicit axes by default, under which
shardings become part of array types and every op must agree on them; the model code is written for the
classic automatic partitioning (shardings only at jit boundaries), which Auto keeps.

`mesh_cfg` is a mapping (`ml_collections.ConfigDict` or dict) with `data` and `fsdp` (device counts, -1 on
one of them = all remaining devices) and `fsdp_min_weight_size`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
DEFAULT_MIN_WEIGHT_SIZE = 2**20


def _mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int]:
  sizes = []
  for axis in MESH_AXES:
    if axis not in mesh_cfg:
      raise ValueError(f"`config.mesh` lacks the field {axis!r}; it must have {list(MESH_AXES)}.")
    size = mesh_cfg[axis]
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"`config.mesh.{axis}` must be a positive int or -1, got {size!r}.")
    sizes.append(size)
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one of `config.mesh.data` and `config.mesh.fsdp` may be -1, got {sizes}.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"`config.mesh` {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
                       f"the fixed axis size {fixed}.")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"`config.mesh` {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but there "
                     f"are {num_devices}.")
  return sizes[0], sizes[1]


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = _mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _check_mesh(mesh) -> None:
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh with axes {MESH_AXES} (see make_mesh), got {mesh!r}.")
  # The model's reshapes carry no output shardings, which Explicit axes (jax.make_mesh's default) demand.
  if any(axis_type != AxisType.Auto for axis_type in mesh.axis_types):
    raise ValueError(f"`mesh` must have Auto axes, got {tuple(t.name for t in mesh.axis_types)}: build it with "
                     f"make_mesh, or with jax.make_mesh(shape, {MESH_AXES}, "
                     "axis_types=(jax.sharding.AxisType.Auto,) * 2).")


# jax.sharding's in JAX 0.10; also in the top-level namespace of later releases, which is tried first.
_use_abstract_mesh = getattr(jax, "use_abstract_mesh", None) or jax.sharding.use_abstract_mesh


def traced_on(mesh: Mesh | AbstractMesh, fn):
  """`fn`, traced with `mesh` as JAX's context mesh: jit this instead of `fn`.

  Ops that split their work over the batch themselves read the context mesh while they are traced: the Pallas
  splat, which XLA's partitioner cannot split (`gaussiantoken_jax.splatting`). The program is otherwise the
  same: the mesh's axes are Auto, so shardings still come only from the jit's arguments. An `AbstractMesh` of
  devices this machine lacks (`jax.sharding.AbstractDevice`) traces the program for them, to lower it ahead of
  time: JAX 0.11's Triton lowering reads the GPU's kind from the context mesh, so a CUDA lowering of the splat
  kernel on a CPU-only machine needs a mesh of abstract GPUs (tests/test_pallas_splat.py).
  """
  abstract_mesh = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with _use_abstract_mesh(abstract_mesh):
      return fn(*args, **kwargs)
  # The jitted program's name (profiles, the compilation cache): that of `fn`, also when it is a partial.
  traced.__name__ = traced.__qualname__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__",
                                                                          "traced"))
  return traced


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch `batch_size` (config field `name`) splits evenly over the mesh,
  as `batch_sharding` splits every batch; checked before anything compiles, which would fail less clearly."""
  if batch_size % mesh.size:
    raise ValueError(f"{name}={batch_size}: the global batch must be a multiple of the {mesh.size} devices of the "
                     f"mesh {dict(mesh.shape)}, over which every batch is split.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh, other dimensions whole."""
  _check_mesh(mesh)
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def param_shardings(mesh: Mesh, abstract_params, min_weight_size: int = DEFAULT_MIN_WEIGHT_SIZE):
  """A NamedSharding for every leaf of `abstract_params` (arrays or jax.ShapeDtypeStruct).

  Replicated, unless the mesh has fsdp > 1 and the leaf has at least `min_weight_size` elements and a
  dimension divisible by the fsdp size: then the largest such dimension is split over "fsdp" (ties go to
  the last one, the output channels of an HWIO kernel or a Dense kernel).
  """
  _check_mesh(mesh)
  if not isinstance(min_weight_size, int) or isinstance(min_weight_size, bool) or min_weight_size < 0:
    raise ValueError(f"`min_weight_size` must be an int >= 0, got {min_weight_size!r}.")
  fsdp = mesh.shape["fsdp"]
  replicated = NamedSharding(mesh, PartitionSpec())

  def rule(path, leaf):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(f"`abstract_params` leaf {jax.tree_util.keystr(path)} must be an array or "
                       f"jax.ShapeDtypeStruct, got {type(leaf).__name__}.")
    shape = tuple(leaf.shape)
    if fsdp == 1 or math.prod(shape) < min_weight_size:
      return replicated
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
      return replicated
    axis = max(divisible, key=lambda a: (shape[a], a))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(rule, abstract_params)

