r"""XLA's memory for one train step on one device, compiled and not run: any batch size, on any machine.

    python benchmarks/step_memory.py --config=configs/imagenet.py --batch_sizes=4,16 [--config.F=V ...]

For each batch size, the train step (generator and discriminator, with LPIPS in the loss when the config has it)
is compiled for the first device with `model.remat_norms` off and on (GroupNorm + swish recomputed in the backward
pass, models/encoder_decoder.py), and `Compiled.memory_analysis()` gives XLA's buffer sizes: the arguments (the
train state, the batch, and the LPIPS weights when LPIPS is in the loss, as jit drops unused arguments), the
temporaries (activations, the residuals the backward pass keeps, workspace) and the outputs (the new state and the
metrics, and the output tuple's 8-byte pointers; the new state reuses the donated one's buffers, so the outputs
add nothing). "total" is arguments + temporaries: what the step needs on the device. The figures are the buffer
assignment of the backend it runs on: on a CPU, XLA:CPU's, which schedules and fuses differently from XLA:GPU, so
run it on a GPU for that GPU's. Durations given in epochs are resolved for a nominal 50,000-image split (they do
not change the step's buffers).
"""
from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from gaussiantoken_jax import config_lib, losses
from gaussiantoken_jax.train import sharding
from gaussiantoken_jax.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/imagenet.py.", lock_config=False)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["4"], "Global batch sizes to compile the step for.")
flags.mark_flags_as_required(["config"])

_NOMINAL_TRAIN_SIZE = 50_000
_GIB = 2.0 ** 30


def step_memory(config, batch_size: int):
  """(arguments, temporaries, outputs) bytes of the train step for `config` at `batch_size` on the first device."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  steps = step_lib.make_steps(config, sharding.make_mesh(dict(data=1, fsdp=1), jax.devices()[:1]))
  dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  lpips_abstract = jax.eval_shape(lambda: losses.LPIPS().init(jax.random.key(0), dummy, dummy)["params"])
  compiled = steps.train_step.trace(steps.abstract_state, steps.abstract_batch(batch_size),
                                    lpips_abstract).lower().compile()
  memory = compiled.memory_analysis()
  return memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes


def main(argv):
  del argv
  config = config_lib.resolve_steps(_CONFIG.value, _NOMINAL_TRAIN_SIZE)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; conv_dtype {config.model.conv_dtype}, "
        f"LPIPS weight {config.loss.lpips_weight}")
  print(f"{'batch':>5} {'remat_norms':>11} {'arguments GiB':>14} {'temporaries GiB':>16} {'outputs GiB':>12} "
        f"{'total GiB':>10} {'compile s':>10}")
  for batch_size in map(int, _BATCH_SIZES.value):
    for remat in (False, True):
      config.model.remat_norms = remat
      start = time.perf_counter()
      arguments, temporaries, outputs = step_memory(config, batch_size)  # compiles a copy
      print(f"{batch_size:>5} {str(remat):>11} {arguments / _GIB:>14.3f} {temporaries / _GIB:>16.3f} "
            f"{outputs / _GIB:>12.3f} {(arguments + temporaries) / _GIB:>10.3f} "
            f"{time.perf_counter() - start:>10.0f}", flush=True)


if __name__ == "__main__":
  app.run(main)
