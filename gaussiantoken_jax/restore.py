"""Loading a trained tokenizer from a training workdir: its config, (EMA) parameters and model state.

    restored = restore.restore_model("/tmp/gt_demo")            # the newest complete checkpoint
    out = restored.model.apply({"params": restored.params, **restored.model_state}, x, train=False)

The config comes from the checkpoint itself (saved beside the state), so the config file is not needed. The
model state holds the codebook and the scale schedule. Evaluation and the tokenizer use the EMA parameters,
as the reference does (`use_ema=False` gives the raw trained ones).

Only the fields the generator needs ("step", "ema_params" or "params", "model_state") are read from the
checkpoint (`Checkpointer.restore_fields`, an Orbax partial restore): the optimizer and discriminator never
reach memory, and a checkpoint whose optimizer or discriminator fields differ from today's TrainState (an
older version's) still restores. The parameters get the shardings of the training mesh built from the
config's `mesh` section on the devices at hand, or of the mesh the caller passes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gaussiantoken_jax.train import checkpointing, sharding
from gaussiantoken_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class RestoredModel:
  """A trained generator.

  Attributes:
    config: the run's config (from the checkpoint).
    step: the training step of the checkpoint.
    steps: the run's `train.step.Steps` (model, mesh, batch sharding, jitted eval step) for this machine's
      devices.
    params: the generator parameters (the EMA ones unless restored with `use_ema=False`), sharded on
      `steps.mesh`.
    model_state: the non-trainable collections ("codebook", and "range_scheduler" for GaussianToken).
    use_ema: whether `params` are the EMA parameters.
  """
  config: ml_collections.ConfigDict
  step: int
  steps: step_lib.Steps
  params: Any
  model_state: Any
  use_ema: bool = True

  @property
  def model(self):
    """The generator module (unbound): `model.apply({"params": params, **model_state}, x, train=False)`."""
    return self.steps.model


def locate_checkpoint(path: epath.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
  """(workdir, step) for a training workdir, its `checkpoints` directory, or one step directory in it.

  A step directory fixes the step (ValueError if `step` names another). FileNotFoundError, naming the path,
  when it does not exist or holds no checkpoint directory.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint path {path} does not exist.")
  if path.name.isdigit() and path.parent.name == checkpointing.CHECKPOINT_SUBDIR:
    if step is not None and step != int(path.name):
      raise ValueError(f"`step`={step} contradicts the step directory {path}.")
    return path.parent.parent, int(path.name)
  if path.name == checkpointing.CHECKPOINT_SUBDIR and not (path / checkpointing.CHECKPOINT_SUBDIR).exists():
    return path.parent, step
  if not (path / checkpointing.CHECKPOINT_SUBDIR).is_dir():
    raise FileNotFoundError(f"{path} holds no checkpoints: expected a training workdir (with a "
                            f"'{checkpointing.CHECKPOINT_SUBDIR}' directory), its '{checkpointing.CHECKPOINT_SUBDIR}' "
                            "directory, or one step directory in it.")
  return path, step


def _mesh_here(mesh_cfg) -> Mesh:
  """The run's mesh on the devices at hand or, where it does not fit them (a run trained with fsdp=8 restored on
  one GPU), the batch over all of them: the mesh decides where weights live, not what they compute."""
  try:
    return sharding.make_mesh(mesh_cfg)
  except ValueError as error:
    logging.info("The run's mesh does not fit the %d devices here (%s); restoring with the batch split over all "
                 "of them and the weights replicated.", jax.device_count(), error)
    return sharding.make_mesh(dict(data=-1, fsdp=1))


def restore_model(workdir: epath.PathLike, step: int | None = None, *, use_ema: bool = True,
                  config: ml_collections.ConfigDict | None = None, mesh: Mesh | None = None) -> RestoredModel:
  """The generator of checkpoint `step` (default: the newest complete one) of a training workdir.

  Args:
    workdir: the training run's `--workdir`, its `checkpoints` directory, or one step directory in it.
    step: the checkpoint step; None for the newest. FileNotFoundError names the available steps.
    use_ema: restore the EMA parameters (evaluation's and the tokenizer's choice); False for the raw ones.
    config: the config to build the model from; default the one saved with the checkpoint (pass one only to
      change what does not touch the parameters, e.g. the mesh or the data section).
    mesh: the device mesh to restore onto; default `sharding.make_mesh(config.mesh)` on all devices, or the
      batch over all devices where the run's mesh does not fit them.

  Raises FileNotFoundError for a path without checkpoints, ValueError for a checkpoint whose generator
  differs from the config's model (names the differing parameters).
  """
  workdir, step = locate_checkpoint(workdir, step)
  checkpointing.silence_orbax_info_logs()
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    # One step for the config and the weights, even if a running training saves a newer one meanwhile, and on
    # every process the step process 0 found: each restores its own shards, which must come from one checkpoint.
    if step is None:
      step = ckpt.latest_step()
      if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
        step = None if step < 0 else step
    if config is None:
      config = ml_collections.ConfigDict(ckpt.restore_config(step))
    steps = step_lib.make_steps(config, _mesh_here(config.mesh) if mesh is None else mesh)
    abstract = steps.abstract_state
    params_field = "ema_params" if use_ema else "params"
    restored = ckpt.restore_fields({"step": abstract.step, params_field: getattr(abstract, params_field),
                                    "model_state": abstract.model_state}, step=step)
  fields = restored.state
  return RestoredModel(config=config, step=restored.step, steps=steps, params=fields[params_field],
                       model_state=fields["model_state"], use_ema=use_ema)
