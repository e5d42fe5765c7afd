"""Loading a trained tokenizer from a training workdir: its config, EMA parameters and model state.

    restored = restore.restore_model("/tmp/gt_demo")            # the newest complete checkpoint
    out = restored.model.apply({"params": restored.params, **restored.model_state}, x, train=False)

The config comes from the checkpoint itself (saved beside the state), so the config file is not needed. The
model state holds the codebook and the scale schedule. Evaluation and the tokenizer use the EMA parameters,
as the reference does.

The state is restored through `train.checkpointing.Checkpointer`, whose restore reads the whole train state:
the optimizer and discriminator are read too and dropped here (about twice the generator's size in memory,
briefly). The parameters keep the shardings of the training mesh built from the config's `mesh` section
on the devices at hand.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from etils import epath

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
    params: the EMA generator parameters, sharded on `steps.mesh`.
    model_state: the non-trainable collections ("codebook", and "range_scheduler" for GaussianToken).
  """
  config: ml_collections.ConfigDict
  step: int
  steps: step_lib.Steps
  params: Any
  model_state: Any

  @property
  def model(self):
    """The generator module (unbound): `model.apply({"params": params, **model_state}, x, train=False)`."""
    return self.steps.model


def restore_model(workdir: epath.PathLike, step: int | None = None, *,
                  config: ml_collections.ConfigDict | None = None) -> RestoredModel:
  """The EMA generator of checkpoint `step` (default: the newest complete one) of a training workdir.

  Args:
    workdir: the training run's `--workdir`.
    step: the checkpoint step; None for the newest. FileNotFoundError names the available steps.
    config: the config to build the model from; default the one saved with the checkpoint (pass one only to
      change what does not touch the parameters, e.g. the mesh or the data section).
  """
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    if config is None:
      config = ml_collections.ConfigDict(ckpt.restore_config(step))
    steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh))
    restored = ckpt.restore(steps.abstract_state, step=step)
  state = restored.state
  return RestoredModel(config=config, step=restored.step, steps=steps, params=state.ema_params,
                       model_state=state.model_state)
