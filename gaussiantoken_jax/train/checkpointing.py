"""Checkpoints of a training run (Orbax) and a preemption guard for the training loop.

Layout: `workdir/checkpoints/<step>/` with three Orbax items:
  state   the train-state pytree (params, EMA params, optimizer states, ...), saved from and restored into
          any sharding (`ocp.args.StandardSave` / `StandardRestore`), or only some of its top-level fields
          (`Checkpointer.restore_fields`, Orbax partial restore: what a tokenizer reads);
  data    optional: the input pipeline's position, as any `ocp.args` item the caller picks (e.g.
          `grain.checkpoint.CheckpointSave(iterator)` or `ocp.args.JsonSave(dict)`);
  config  the run's config as JSON, so a tokenizer can rebuild the model without the config file.

Saves are asynchronous by default (`async_save=True`; the trainer turns it off for runs of several processes):
`save` returns once the arrays are copied off the devices and the writing goes on in a background thread; `wait`
blocks until it is on disk. Orbax writes each step into a temporary directory and renames it when complete (or,
on object stores, writes a `commit_success.txt` last).

A save cut short by a kill leaves either a temporary directory (Orbax ignores it; we let Orbax delete it at
start-up) or, on file systems without atomic rename or after an interrupted copy, a step directory without
the completion markers. Such a step is never restored, and at start-up it is renamed to `<step>.incomplete`
(kept for inspection), because Orbax would otherwise count it as the latest step and refuse every later
save with a smaller step number.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging as std_logging
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gaussiantoken_jax.checks import check_positive_int
from gaussiantoken_jax.train import distributed, optim
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"

# Orbax's replica-parallel saving (each replica of a replicated array writes one slice of it) cuts every array
# per device with a jitted slice: one compilation per leaf shape. On the 8-device CPU mesh the first save of the
# runlocal state held the step for 24 s that way and 0.2 s without (docs/training.md), for arrays small enough to
# write at once; Orbax itself turns it off on GPUs. The handler is Orbax's global one for jax.Array, so this holds
# for every save here.
@contextlib.contextmanager
def _without_orbax_warnings(*beginnings: str):
  """Drops the log records that begin so: Orbax's warnings about what this module does on purpose, which would
  otherwise open every command's output (the handler override, a read-only directory, the item-level metadata
  file a CheckpointManager's items do not have)."""
  def keep(record) -> bool:
    return not record.getMessage().startswith(beginnings)

  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


with _without_orbax_warnings("Type handler registry"):
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                          override=True)

# Written by Orbax as the last act of a save (since orbax-checkpoint 0.11 for every file system).
_COMMIT_FILE = "commit_success.txt"
# Orbax's per-step metadata; it gets a commit timestamp when the step is finalised.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# Every Checkpointer of a process makes one barrier, in the same order on every process: a unique name each.
_BARRIER_COUNT = itertools.count()


def _orbax_info_filter(record) -> bool:
  return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname.replace("\\", "/")


def silence_orbax_info_logs() -> None:
  """Drops Orbax's INFO lines (a dozen per save or restore, burying a run's own lines); its warnings and errors
  still show."""
  absl_logger = logging.get_absl_logger()
  if _orbax_info_filter not in absl_logger.filters:
    absl_logger.addFilter(_orbax_info_filter)


def is_complete_step(step_dir: epath.PathLike) -> bool:
  """Whether a step directory holds a finished Orbax save (commit file, or a commit timestamp)."""
  step_dir = epath.Path(step_dir)
  if (step_dir / _COMMIT_FILE).exists():
    return True
  metadata_file = step_dir / _STEP_METADATA_FILE
  if not metadata_file.exists():
    return False
  try:
    return json.loads(metadata_file.read_text()).get("commit_timestamp_nsecs") is not None
  except (ValueError, AttributeError):
    return False


def _config_to_json_dict(config) -> dict[str, Any]:
  """A JSON round trip of `config` (ConfigDict or mapping), so exactly what is saved is what is restored."""
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict / FrozenConfigDict
    return json.loads(config.to_json_best_effort())
  if not isinstance(config, Mapping):
    raise ValueError(f"`config` must be an ml_collections.ConfigDict or a mapping, got {type(config).__name__}.")
  try:
    return json.loads(json.dumps(dict(config)))
  except TypeError as e:
    raise ValueError(f"`config` must be JSON-serialisable: {e}") from e


# What a resumed run must share with the saved one: the global batch and the seed fix the data order and every
# random draw, the model sections the parameters' meaning. The splat's kernel, the convolutions' compute dtype
# and recomputing GroupNorm in the backward pass change how the same parameters are computed, not what they are.
_SAME_ON_RESUME = ("batch_size", "seed", "model", "discriminator")
_MAY_DIFFER_ON_RESUME = ("model.splat_impl", "model.conv_dtype", "model.remat_norms")
_OPTIMIZERS = ("optimizer", "disc_optimizer")


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; other leaves (lists included) stay whole."""
  if not isinstance(tree, Mapping) or not tree:
    return {prefix: tree}
  flat = {}
  for name, sub in tree.items():
    flat.update(_flatten(sub, f"{prefix}.{name}" if prefix else name))
  return flat


def check_resumable(saved_config: Mapping[str, Any], config, where: str = "the checkpoint") -> None:
  """Raises ValueError, naming the saved and the requested values, when `config` may not continue a run
  saved with `saved_config` (`Checkpointer.restore_config()`): a different global batch size, seed, model or
  discriminator field, or optimizer settings whose state has another structure (`optim.state_layout`). Fields
  only one side has, e.g. from another version, are not compared."""
  requested = _config_to_json_dict(config)
  saved = _flatten({name: saved_config[name] for name in _SAME_ON_RESUME if name in saved_config})
  wanted = _flatten({name: requested[name] for name in _SAME_ON_RESUME if name in requested})
  differ = [f"{key}: saved {saved[key]!r}, requested {wanted[key]!r}" for key in sorted(saved)
            if key in wanted and saved[key] != wanted[key] and key not in _MAY_DIFFER_ON_RESUME]
  for name in _OPTIMIZERS:  # the optimizer state in the checkpoint has the saved settings' structure
    if name in saved_config and name in requested:
      layouts = optim.state_layout(saved_config[name]), optim.state_layout(requested[name])
      if layouts[0] != layouts[1]:
        differ.append(f"{name}'s state: saved {layouts[0]}, requested {layouts[1]}")
  if differ:
    raise ValueError(f"Cannot resume from {where}: this config differs from the run's own in {'; '.join(differ)}. "
                     "Resume with the saved values, or train in a new workdir.")


def changed_settings(saved_config: Mapping[str, Any], config) -> list[str]:
  """"field: saved X, now Y" for every field of `config` whose value differs from the saved run's (a resumed
  run may change what `check_resumable` allows: durations, learning rates, data, logging ...)."""
  saved, now = _flatten(dict(saved_config)), _flatten(_config_to_json_dict(config))
  return [f"{key}: saved {saved[key]!r}, now {now[key]!r}" for key in sorted(now)
          if key in saved and saved[key] != now[key]]


def _abstract_leaf(path, leaf):
  """An array becomes its ShapeDtypeStruct; either way the leaf must say which sharding to restore into."""
  if isinstance(leaf, jax.Array):
    leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
    raise ValueError(
        f"`abstract_state` leaf {jax.tree_util.keystr(path)} must be a jax.Array or a jax.ShapeDtypeStruct with "
        f"a sharding, got {leaf!r}.")
  return leaf


def _leaf_differences(saved_tree, abstract_tree) -> list[str]:
  """'path: what differs' for each leaf of `abstract_tree` missing from, or shaped or typed otherwise than,
  the saved metadata tree `saved_tree` (and each saved leaf the abstract tree lacks)."""
  def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, wanted = flat(saved_tree), flat(abstract_tree)
  differ = []
  for key, leaf in wanted.items():
    if key not in saved:
      differ.append(f"{key}: not in the checkpoint")
    elif tuple(saved[key].shape) != tuple(leaf.shape) or np.dtype(saved[key].dtype) != np.dtype(leaf.dtype):
      differ.append(f"{key}: saved {np.dtype(saved[key].dtype)}{list(saved[key].shape)}, expected "
                    f"{np.dtype(leaf.dtype)}{list(leaf.shape)}")
  differ.extend(f"{key}: in the checkpoint only" for key in saved if key not in wanted)
  return differ


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns: the step, the state, and the data item (None if not asked for);
  `restore_fields` returns the step and a dict of the fields asked for."""
  step: int
  state: Any
  data: Any


class Checkpointer:
  """A training run's checkpoints in `workdir/checkpoints`; every process of a run must create and call it.

  Typical use in a training loop:

    ckpt = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
      step, state, _ = ckpt.restore(abstract_state, data=grain.checkpoint.CheckpointRestore(data_iter))
    ...
    ckpt.save(step, state, config=config, data=grain.checkpoint.CheckpointSave(data_iter))
    ...
    ckpt.close()  # waits for the last save

  `read_only=True` (evaluation, the tokenizer) neither saves nor touches the directory.
  """

  def __init__(self, workdir: epath.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    if max_to_keep is not None:  # None: keep all
      check_positive_int("Checkpointer", "max_to_keep", max_to_keep)
    self.directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"No checkpoint directory {self.directory}.")
    if not read_only:
      self._set_aside_incomplete_steps()
    options = ocp.CheckpointManagerOptions(
        # Read-only managers keep everything and save nothing; saying so spares the user Orbax's two warnings
        # that it changed these options itself.
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save,
        # Temporary directories of saves that were cut short are garbage: let Orbax delete them.
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    with _without_orbax_warnings("Given directory is read only"):
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, CONFIG))

  def _set_aside_incomplete_steps(self) -> None:
    """Renames step directories without completion markers to `<step>.incomplete` (process 0 renames)."""
    if jax.process_index() == 0 and self.directory.exists():
      for step_dir in self.directory.iterdir():
        if step_dir.name.isdigit() and step_dir.is_dir() and not is_complete_step(step_dir):
          target = self.directory / f"{step_dir.name}.incomplete"
          if target.exists():
            target = self.directory / f"{step_dir.name}.incomplete-{time.time_ns()}"
          logging.warning("Checkpoint step %s is incomplete (a save cut short?); moving it to %s.", step_dir, target)
          step_dir.rename(target)
    # The coordination service, not a device collective (see distributed.barrier).
    distributed.barrier(f"gaussiantoken_jax.checkpointing.set_aside_incomplete_steps.{next(_BARRIER_COUNT)}")

  def all_steps(self) -> list[int]:
    """The steps of all complete checkpoints on disk, in increasing order (a save in flight is not one)."""
    return sorted(s for s in self._manager.all_steps() if is_complete_step(self.directory / str(s)))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, *, config=None, data: ocp.args.CheckpointArgs | None = None) -> bool:
    """Starts saving `state` (and `config`, `data`) as `step`; returns False if Orbax skipped the step.

    Orbax skips a step that is not newer than the latest checkpoint. `data` is any Orbax save-args item
    (e.g. `grain.checkpoint.CheckpointSave(iterator)`), evaluated now, so the iterator may move on at once.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
      raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
    if data is not None and not isinstance(data, ocp.args.CheckpointArgs):
      raise ValueError(f"`data` must be an orbax.checkpoint.args item (e.g. ocp.args.JsonSave(...) or "
                       f"grain.checkpoint.CheckpointSave(iterator)), got {type(data).__name__}.")
    items = {STATE: ocp.args.StandardSave(state)}
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(_config_to_json_dict(config))
    if data is not None:
      items[DATA] = data
    return self._manager.save(int(step), args=ocp.args.Composite(**items))

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"No complete checkpoint for step {step} in {self.directory}; there are {steps}.")
    return step

  def restore(self, abstract_state, *, step: int | None = None,
              data: ocp.args.CheckpointArgs | None = None) -> Restored:
    """Restores `step` (default: the latest complete one) into the shardings of `abstract_state`.

    `abstract_state` is a pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`s with a
    `.sharding` (e.g. from `jax.eval_shape` plus `sharding.param_shardings`) or arrays, whose shape, dtype
    and sharding are used. Each device reads only its own shards. `data` is the Orbax restore-args item
    matching what `save` got (e.g. `grain.checkpoint.CheckpointRestore(iterator)`, which restores the
    iterator in place).
    """
    step = self._resolve_step(step)
    if data is not None and not isinstance(data, ocp.args.CheckpointArgs):
      raise ValueError(f"`data` must be an orbax.checkpoint.args restore item (e.g. ocp.args.JsonRestore() or "
                       f"grain.checkpoint.CheckpointRestore(iterator)), got {type(data).__name__}.")
    abstract_state = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_state)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data is not None:
      items[DATA] = data
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step=step, state=restored[STATE], data=restored[DATA] if data is not None else None)

  def saved_state_metadata(self, step: int | None = None) -> dict[str, Any]:
    """The saved state's tree of `step` (default: the latest complete one) as Orbax metadata (shape and dtype
    per leaf, top level keyed by the TrainState's field names); reads no arrays."""
    step = self._resolve_step(step)
    with ocp.PyTreeCheckpointer() as checkpointer, _without_orbax_warnings("Metadata file does not exist"):
      metadata = checkpointer.metadata(self.directory / str(step) / STATE).item_metadata
    if metadata is None:  # Orbax's answer when the state's metadata file is missing or unreadable
      raise ValueError(f"Checkpoint step {step} in {self.directory} has no readable state metadata: an incomplete "
                       f"or damaged copy? Steps there: {self.all_steps()}.")
    return dict(metadata)

  def restore_fields(self, abstract_fields: Mapping[str, Any], *, step: int | None = None) -> Restored:
    """Restores only some top-level fields of the saved state, e.g. {"step", "ema_params", "model_state"}.

    `abstract_fields` maps field names of the saved state to pytrees like the saved ones, whose leaves say
    shape, dtype and sharding as in `restore`. Only these fields are read (Orbax partial restore), so a
    checkpoint whose other fields (optimizer, discriminator) differ from today's TrainState still restores,
    and the optimizer state never reaches memory. Returns `Restored` with `state` a dict of the fields.

    Raises ValueError, naming what differs, when a field or leaf is not in the checkpoint or has another
    shape or dtype there (another model config), instead of Orbax's own error (or its silent return of the
    abstract leaf for a missing one).
    """
    step = self._resolve_step(step)
    if not isinstance(abstract_fields, Mapping) or not abstract_fields:
      raise ValueError(f"`abstract_fields` must be a non-empty mapping of state field names, got {abstract_fields!r}.")
    abstract_fields = jax.tree_util.tree_map_with_path(_abstract_leaf, dict(abstract_fields))
    saved = self.saved_state_metadata(step)
    missing = sorted(set(abstract_fields) - set(saved))
    if missing:
      raise ValueError(f"Checkpoint step {step} in {self.directory} has no state field(s) {missing}; it has "
                       f"{sorted(saved)}.")
    differ = _leaf_differences({name: saved[name] for name in abstract_fields}, abstract_fields)
    if differ:
      shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
      raise ValueError(f"Checkpoint step {step} in {self.directory} does not match the model to restore into "
                       f"(was it trained with another model config?): {shown}.")
    item = ocp.args.PyTreeRestore(item=abstract_fields,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_fields),
                                  partial_restore=True)
    # Its own PyTree checkpointer: the manager may have registered the state item as a StandardSave already.
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(self.directory / str(step) / STATE, args=item)
    return Restored(step=step, state=dict(restored), data=None)

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with `step` (default: the latest complete one), as a plain dict."""
    step = self._resolve_step(step)
    if not (self.directory / str(step) / CONFIG).exists():
      raise FileNotFoundError(f"Checkpoint step {step} in {self.directory} was saved without a config.")
    return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    """Blocks until every save started so far is on disk."""
    self._manager.wait_until_finished()

  def saved_process_count(self, step: int | None = None) -> int | None:
    """How many processes saved `step`'s data positions (grain writes `process_<i>-of-<n>.json` in each), or
    None when it has none."""
    names = [path.name for path in (self.directory / str(self._resolve_step(step)) / DATA).glob("process_*-of-*.json")]
    counts = {int(name.rsplit("-of-", 1)[1].removesuffix(".json")) for name in names}
    return counts.pop() if len(counts) == 1 else None

  def newest_step(self) -> int | None:
    """The newest complete step once the saves in flight are on disk (`latest_step` does not wait for them)."""
    self.wait()
    return self.latest_step()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's background resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PreemptionGuard:
  """Turns SIGTERM (preemption, `scancel`, `kill`) into a request to stop at the next step boundary.

  The signal handler only sets a flag: it runs between two Python bytecodes of the main thread, where
  saving a checkpoint or touching devices is unsafe. The loop asks `should_stop(step)` after each step and,
  when it says True, saves a checkpoint and returns.

  With several processes, all of them must stop at the same step, or the ones that go on would hang in
  the next collective. So `should_stop` all-gathers the flags (`multihost_utils.process_allgather`) and
  stops everyone when any process was signalled. The all-gather waits for the devices, so it is done only
  every `sync_every_steps` steps (pass the logging interval, where the loop fetches metrics anyway). JAX's
  own `reached_preemption_sync_point` is not used: it needs `jax.distributed`'s preemption service,
  which catches SIGTERM itself, and does not exist in a single process (CPU tests, one-GPU runs).
  With one process the flag is read directly, every step, at no cost. Create the guard after
  `jax.distributed.initialize()`, so that its handler, not one installed there, is the one SIGTERM reaches.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *, sync_every_steps: int = 1):
    check_positive_int("PreemptionGuard", "sync_every_steps", sync_every_steps)
    self._sync_every_steps = sync_every_steps
    self._signalled = False
    self._stopping = False
    # signal.signal raises ValueError outside the main thread, which is the right error for this misuse.
    self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in signals}

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  @property
  def signalled(self) -> bool:
    """Whether this process has received one of the signals."""
    return self._signalled

  def should_stop(self, step: int) -> bool:
    """True, on every process at the same step, once any process has been signalled."""
    if self._stopping:
      return True
    if jax.process_count() == 1:
      self._stopping = self._signalled
    elif step % self._sync_every_steps == 0:
      flags = multihost_utils.process_allgather(np.asarray(self._signalled, np.int32))
      self._stopping = bool(np.any(flags))
    if self._stopping:
      logging.warning("Preemption signal received: stopping at step %d.", step)
    return self._stopping

  def close(self) -> None:
    """Puts back the signal handlers that were installed before."""
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)
    self._previous_handlers = {}

  def __enter__(self) -> PreemptionGuard:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
