"""Mesh, batch and parameter shardings on the 8 host CPU devices that conftest.py sets up."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from gaussiantoken_jax.train import sharding


@pytest.fixture(scope="module")
def mesh_4x2():
  return sharding.make_mesh(dict(data=4, fsdp=2))


@pytest.mark.parametrize("cfg, want", [
    (dict(data=-1, fsdp=1), (8, 1)),
    (dict(data=4, fsdp=2), (4, 2)),
    (dict(data=2, fsdp=-1), (2, 4)),
    (dict(data=-1, fsdp=8, fsdp_min_weight_size=2**20), (1, 8)),
])
def test_make_mesh_shapes(cfg, want):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(cfg)
  assert tuple(mesh.axis_names) == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == want
  assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_subset_of_devices():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2), devices=jax.devices()[:4])
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == (2, 2)


@pytest.mark.parametrize("cfg, message", [
    (dict(data=3, fsdp=1), "needs 3 devices"),
    (dict(data=-1, fsdp=3), "not divisible"),
    (dict(data=-1, fsdp=-1), "At most one"),
    (dict(data=0, fsdp=1), r"config.mesh.data` must be a positive int or -1, got 0"),
    (dict(data=8), "lacks the field 'fsdp'"),
])
def test_make_mesh_rejects_bad_config(cfg, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(cfg)


def test_batch_sharding_splits_the_batch_over_all_devices(mesh_4x2):
  labels = np.arange(16, dtype=np.int32)
  images = np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3)
  sharded_labels = jax.device_put(labels, sharding.batch_sharding(mesh_4x2))
  sharded_images = jax.device_put(images, sharding.batch_sharding(mesh_4x2))
  # Eight devices, two rows each, and every row on exactly one device; the other dimensions stay whole.
  rows_seen = []
  for shard in sharded_labels.addressable_shards:
    assert shard.data.shape == (2,)
    rows_seen.extend(np.asarray(shard.data).tolist())
  assert sorted(rows_seen) == list(range(16))
  assert {shard.data.shape for shard in sharded_images.addressable_shards} == {(2, 2, 3)}
  with pytest.raises(ValueError, match="mesh"):
    sharding.batch_sharding("not a mesh")
  explicit = jax.make_mesh((4, 2), sharding.MESH_AXES, axis_types=(AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match=r"`mesh` must have Auto axes, got \('Explicit', 'Explicit'\)"):
    sharding.batch_sharding(explicit)


def test_param_shardings_divide_by_the_fsdp_size():
  """fsdp = 4: only dimensions divisible by 4 may be split (10 is even, but 10 rows do not split over 4)."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  abstract = {"a": jax.ShapeDtypeStruct((8, 10), jnp.float32), "b": jax.ShapeDtypeStruct((6, 10), jnp.float32)}
  got = sharding.param_shardings(mesh, abstract, min_weight_size=0)
  assert (got["a"].spec, got["b"].spec) == (P("fsdp", None), P())


def test_check_batch_size_counts_every_device_of_the_mesh(mesh_4x2):
  """The batch is split over data x fsdp = 8 devices: 4 (a multiple of the data axis alone) does not split."""
  sharding.check_batch_size("config.batch_size", 16, mesh_4x2)
  with pytest.raises(ValueError, match=r"config.batch_size=4: the global batch must be a multiple of the 8 devices"):
    sharding.check_batch_size("config.batch_size", 4, mesh_4x2)


def test_param_shardings_rule(mesh_4x2):
  abstract = {
      "dense": jax.ShapeDtypeStruct((16, 8), jnp.float32),  # largest divisible dim: 0
      "conv": jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),  # largest divisible dim: 3
      "tie": jax.ShapeDtypeStruct((8, 8), jnp.float32),  # tie: the last one
      "odd": jax.ShapeDtypeStruct((5, 7), jnp.float32),  # nothing divisible by 2: replicated
      "small": jax.ShapeDtypeStruct((4,), jnp.float32),  # under min_weight_size: replicated
  }
  got = sharding.param_shardings(mesh_4x2, abstract, min_weight_size=10)
  want = {"dense": P("fsdp", None), "conv": P(None, None, None, "fsdp"), "tie": P(None, "fsdp"), "odd": P(),
          "small": P()}
  for name, spec in want.items():
    assert got[name].spec == spec, name
    assert got[name].mesh == mesh_4x2
  # Without an fsdp axis everything is replicated, whatever its size.
  data_only = sharding.make_mesh(dict(data=-1, fsdp=1))
  for s in jax.tree.leaves(sharding.param_shardings(data_only, abstract, min_weight_size=0)):
    assert s.spec == P()
  with pytest.raises(ValueError, match="leaf \\['bad'\\]"):
    sharding.param_shardings(mesh_4x2, {"bad": "not an array"})
  # "At least min_weight_size elements": a weight of exactly that many is split.
  exact = sharding.param_shardings(mesh_4x2, {"w": jax.ShapeDtypeStruct((2, 5), jnp.float32)}, min_weight_size=10)
  assert exact["w"].spec == P("fsdp", None)
  with pytest.raises(ValueError, match="mesh"):
    sharding.param_shardings("not a mesh", abstract)
