"""Checkpoint save/restore with real Orbax, real grain iterators and 8 CPU devices; preemption guard."""
import json
import os
import re
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gaussiantoken_jax.train import checkpointing, optim, sharding


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(data=4, fsdp=2))


def _state(mesh, step):
  """A small train-state-like pytree: an fsdp-sharded kernel, a replicated bias, a counter."""
  kernel = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) + 100 * step
  return {
      "params": {
          "kernel": jax.device_put(kernel, NamedSharding(mesh, P("fsdp", None))),
          "bias": jax.device_put(np.full((6,), step, np.float32), NamedSharding(mesh, P())),
      },
      "step": jax.device_put(np.int32(step), NamedSharding(mesh, P())),
  }


def _abstract(mesh, kernel_spec):
  return {
      "params": {
          "kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, kernel_spec)),
          "bias": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P())),
      },
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
  }


def _assert_state_is(restored, mesh, step, kernel_spec):
  want = _state(mesh, step)
  for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  kernel = restored["params"]["kernel"]
  assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, kernel_spec), 2)


def test_round_trip_keeps_last_n_and_restores_latest(tmp_path, mesh):
  config = ml_collections.ConfigDict(dict(seed=1, model=dict(widths=(64, 128)), name="cifar"))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with checkpointing.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
      next(iterator)
      assert ckpt.save(step, _state(mesh, step), config=config, data=grain.checkpoint.CheckpointSave(iterator))
    # The iterator moves on while the save is in flight; the checkpoint keeps the position at save time (3).
    next(iterator)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    assert ckpt.saved_process_count() == 1  # grain wrote process_0-of-1.json: one process

  # A fresh process would do exactly this: new Checkpointer, new iterator, restore into a different sharding.
  with checkpointing.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    fresh_iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    restored = ckpt.restore(_abstract(mesh, P(None, "fsdp")),
                            data=grain.checkpoint.CheckpointRestore(fresh_iterator))
    assert restored.step == 3
    _assert_state_is(restored.state, mesh, 3, P(None, "fsdp"))
    assert next(fresh_iterator) == 3
    older = ckpt.restore(_abstract(mesh, P("data", None)), step=2)
    _assert_state_is(older.state, mesh, 2, P("data", None))
    assert older.data is None
    assert ckpt.restore_config() == {"seed": 1, "model": {"widths": [64, 128]}, "name": "cifar"}
    with pytest.raises(FileNotFoundError, match="step 1"):
      ckpt.restore(_abstract(mesh, P()), step=1)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_restore_into_arrays_and_json_data_item(tmp_path, mesh):
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, _state(mesh, 5), config={"total_steps": 10}, data=ocp.args.JsonSave({"epoch": 2}))
    # Arrays work as their own abstract description (shape, dtype and sharding are taken from them).
    restored = ckpt.restore(_state(mesh, 0), data=ocp.args.JsonRestore())
  _assert_state_is(restored.state, mesh, 5, P("fsdp", None))
  assert restored.data == {"epoch": 2}
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.saved_process_count() is None  # a JSON data item: no per-process iterator files


def test_step_0_is_a_checkpoint_like_any_other(tmp_path, mesh):
  """The initial state (step 0) saves and restores: a run may checkpoint before its first step."""
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(0, _state(mesh, 0))
    assert ckpt.latest_step() == 0
    _assert_state_is(ckpt.restore(_abstract(mesh, P())).state, mesh, 0, P())


def test_restore_fields_reads_only_the_fields_asked_for(tmp_path, mesh):
  state = {**_state(mesh, 4), "opt_state": jax.device_put(np.ones((3,), np.float32), NamedSharding(mesh, P()))}
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(4, state)
    abstract = _abstract(mesh, P(None, "fsdp"))
    restored = ckpt.restore_fields({"params": abstract["params"], "step": abstract["step"]})
    assert restored.step == 4 and sorted(restored.state) == ["params", "step"]
    _assert_state_is(restored.state, mesh, 4, P(None, "fsdp"))
    # Today's state may differ in the fields not read (an older checkpoint's optimizer): not looked at.
    with pytest.raises(ValueError, match=r"has no state field\(s\) \['disc_params'\]; it has \['opt_state', "
                       r"'params', 'step'\]"):
      ckpt.restore_fields({"disc_params": abstract["params"]})
    wrong = {"params": {**abstract["params"], "bias": jax.ShapeDtypeStruct((7,), jnp.float32,
                                                                           sharding=NamedSharding(mesh, P()))}}
    with pytest.raises(ValueError, match=r"another model config.*\['params'\]\['bias'\]: saved float32\[6\], "
                       r"expected float32\[7\]"):
      ckpt.restore_fields(wrong)
    extra = {"params": {**abstract["params"], "scale": abstract["params"]["bias"]}}
    with pytest.raises(ValueError, match=r"\['params'\]\['scale'\]: not in the checkpoint"):
      ckpt.restore_fields(extra)
    # Another dtype (Orbax would cast silently) and a saved leaf the model lacks (Orbax would drop it silently).
    bf16 = {"params": {**abstract["params"], "bias": jax.ShapeDtypeStruct((6,), jnp.bfloat16,
                                                                          sharding=NamedSharding(mesh, P()))}}
    with pytest.raises(ValueError, match=r"\['params'\]\['bias'\]: saved float32\[6\], expected bfloat16\[6\]"):
      ckpt.restore_fields(bf16)
    fewer = {"params": {"kernel": abstract["params"]["kernel"]}}
    with pytest.raises(ValueError, match=r"\['params'\]\['bias'\]: in the checkpoint only"):
      ckpt.restore_fields(fewer)


def _run_config(**changes):
  config = ml_collections.ConfigDict(dict(
      seed=0, batch_size=8, total_steps=20, model=dict(ch=16, ch_mult=(1, 2), splat_impl="auto", embedder=dict(
          num_blocks=2), conv_dtype="float32", remat_norms=False), discriminator=dict(ndf=8),
      optimizer=dict(name="adamw", learning_rate=1e-4, weight_decay=0.05, grad_clip_norm=0.0),
      disc_optimizer=dict(name="adam", learning_rate=1e-4, weight_decay=0.0, grad_clip_norm=0.0)))
  for path, value in changes.items():
    *parents, leaf = path.split("__")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


@pytest.mark.parametrize("changes, named", [
    (dict(batch_size=16), "batch_size: saved 8, requested 16"),
    (dict(seed=1), "seed: saved 0, requested 1"),
    (dict(model__ch=32), "model.ch: saved 16, requested 32"),
    (dict(model__ch_mult=(1, 2, 2)), "model.ch_mult: saved [1, 2], requested [1, 2, 2]"),
    (dict(model__embedder__num_blocks=3), "model.embedder.num_blocks: saved 2, requested 3"),
    (dict(discriminator__ndf=16), "discriminator.ndf: saved 8, requested 16"),
    (dict(optimizer__grad_clip_norm=1.0), "optimizer's state: saved adamw, requested global-norm clipping + adamw"),
    (dict(optimizer__name="adam"), "optimizer's state: saved adamw, requested coupled L2 decay + adam"),
    (dict(disc_optimizer__weight_decay=0.1), "disc_optimizer's state: saved adam, requested coupled L2 decay + adam"),
])
def test_resuming_with_another_batch_seed_or_model_names_both_values(tmp_path, mesh, changes, named):
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, _state(mesh, 5), config=_run_config())
    saved = ckpt.restore_config()
  with pytest.raises(ValueError, match="Cannot resume from run X: .*" + re.escape(named)):
    checkpointing.check_resumable(saved, _run_config(**changes), where="run X")
  # What may change on resume: the length of the run, how the model computes, the optimizer's rates; the trainer
  # logs each change.
  allowed = _run_config(total_steps=40, model__splat_impl="xla", model__conv_dtype="bfloat16", model__remat_norms=True,
                        optimizer__learning_rate=1e-5, optimizer__weight_decay=0.0)
  checkpointing.check_resumable(saved, allowed)
  assert checkpointing.changed_settings(saved, allowed) == [
      "model.conv_dtype: saved 'float32', now 'bfloat16'", "model.remat_norms: saved False, now True",
      "model.splat_impl: saved 'auto', now 'xla'", "optimizer.learning_rate: saved 0.0001, now 1e-05",
      "optimizer.weight_decay: saved 0.05, now 0.0", "total_steps: saved 20, now 40"]


def test_round_trip_of_a_sharded_train_state_with_optimizer_state(tmp_path, mesh):
  """The pieces as the train loop combines them: a state with optax state created in its shardings (as
  `Steps.init` does), and its eval_shape abstract."""
  tx = optim.make_optimizer(dict(name="adamw", learning_rate=0.1, init_learning_rate=0.01, b1=0.9, b2=0.999,
                                 weight_decay=0.05, warmup_steps=2, grad_clip_norm=1.0), total_steps=10)

  def init(rng):
    params = {"w": jax.random.normal(rng, (8, 16)), "b": jnp.zeros(16)}
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

  rng = jax.random.key(0)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.param_shardings(mesh, abstract, min_weight_size=16)
  state = jax.jit(init, out_shardings=shardings)(rng)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, state)
    ckpt.wait()
    restored = ckpt.restore(abstract).state
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
  # The Adam moments of the large kernel are fsdp-sharded like the kernel itself.
  assert [leaf.sharding.spec for leaf in jax.tree.leaves(restored["opt_state"]) if leaf.shape == (8, 16)] == [
      P(None, "fsdp")] * 2


def test_partial_steps_are_ignored(tmp_path, mesh):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, _state(mesh, 3))
  directory = tmp_path / "checkpoints"
  # A save killed mid-way: Orbax's temporary directory with half the files...
  (directory / "4.orbax-checkpoint-tmp-1234567" / "state").mkdir(parents=True)
  (directory / "4.orbax-checkpoint-tmp-1234567" / "state" / "_METADATA").write_text("{trunc")
  # ...and a step directory without completion markers (non-atomic file system, interrupted copy).
  (directory / "9" / "state").mkdir(parents=True)
  (directory / "9" / "_CHECKPOINT_METADATA").write_text(json.dumps({"init_timestamp_nsecs": 1}))

  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    _assert_state_is(ckpt.restore(_abstract(mesh, P())).state, mesh, 3, P())
    # Orbax would refuse steps below a (bogus) step 9; the incomplete step no longer blocks saving.
    assert ckpt.save(4, _state(mesh, 4))
    ckpt.wait()
    assert ckpt.latest_step() == 4
  names = sorted(p.name for p in directory.iterdir())
  assert "9.incomplete" in names and "9" not in names
  assert not any("orbax-checkpoint-tmp" in name for name in names)


def test_read_only_and_bad_arguments(tmp_path, mesh):
  with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
    checkpointing.Checkpointer(tmp_path / "nowhere", read_only=True)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
      ckpt.restore(_abstract(mesh, P()))
    with pytest.raises(ValueError, match="`data`"):
      ckpt.save(1, _state(mesh, 1), data={"epoch": 1})
    with pytest.raises(ValueError, match="`step`"):
      ckpt.save(-1, _state(mesh, 1))
    ckpt.save(1, _state(mesh, 1))
    ckpt.wait()
    unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract(mesh, P()))
    with pytest.raises(ValueError, match="leaf \\['params'\\]\\['bias'\\]"):
      ckpt.restore(unsharded)
    with pytest.raises(FileNotFoundError, match="without a config"):
      ckpt.restore_config()
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 1
    assert set(ckpt.saved_state_metadata()) == {"params", "step"}
  # A damaged copy (its state's tree metadata gone): named, where Orbax returns None.
  (tmp_path / checkpointing.CHECKPOINT_SUBDIR / "1" / checkpointing.STATE / "_METADATA").unlink()
  with checkpointing.Checkpointer(tmp_path, read_only=True) as ckpt:
    with pytest.raises(ValueError, match=r"Checkpoint step 1 in .* has no readable state metadata"):
      ckpt.saved_state_metadata()
  for bad in (0, True, 2.0):  # a bool is not a count
    with pytest.raises(ValueError, match=rf"Checkpointer: `max_to_keep` must be a positive int, got {bad!r}"):
      checkpointing.Checkpointer(tmp_path, max_to_keep=bad)


def test_preemption_guard_sets_a_flag_on_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionGuard() as guard:
    assert not guard.signalled
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)  # Without the guard this would end the test run.
    assert guard.signalled
    assert guard.should_stop(1)
    assert guard.should_stop(2)  # It stays stopped.
  assert signal.getsignal(signal.SIGTERM) is previous
  for bad in (0, True):
    with pytest.raises(ValueError, match=rf"`sync_every_steps` must be a positive int, got {bad!r}"):
      checkpointing.PreemptionGuard(sync_every_steps=bad)
