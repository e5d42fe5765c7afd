r"""Evaluates a training run's checkpoint: rFID, KID, PSNR (two ways), SSIM, LPIPS, codebook usage; pictures.

  python -m gaussiantoken_jax.evaluate --workdir=/tmp/gt_demo --output=/tmp/gt_demo/eval.json
  python -m gaussiantoken_jax.evaluate --workdir=DIR --step=600 --split=test --num_images=1000 --output=FILE.json
  python -m gaussiantoken_jax.evaluate --workdir=DIR --output=FILE.json --fit_geometry_steps=25

Restores the EMA weights of the newest (or `--step`) checkpoint with the config saved beside it, runs the
evaluation split (default: the config's `data.eval_split`) through the sharded model and writes the metrics
as JSON: {"rfid", "kid", "kid_std", "psnr", "psnr_block_baseline", "psnr_uint8", "ssim", "lpips",
"codebook_usage", "perplexity", "num_images", "fit_geometry_steps", "step", "batch_size", "config_name",
"split", "workdir", "config"}. Beside it go the pictures, `<output stem>_reconstructions.png`,
`_gaussians.png` (GaussianToken) and `_codebook_usage.png`. See docs/evaluation.md for the definitions.
`--fit_geometry_steps=N` (GaussianToken) evaluates the tokenizer with each image's geometry fitted to the image
at encode time (`geometry_fit`); the record says how many steps. `--batch_size` sets the evaluation batch
(default: the run's). With several processes, start it on every process, like training.
"""
from __future__ import annotations

import json
import math
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
from PIL import Image

from gaussiantoken_jax import data, losses, restore
from gaussiantoken_jax.evaluation import evaluator as evaluator_lib
from gaussiantoken_jax import cli_flags, command_line
from gaussiantoken_jax.evaluation import inception
from gaussiantoken_jax.train import distributed, sharding

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a command: `--output`, `--split` and `--workdir` are also the flags of other
  # commands (data.inspect, main), and absl refuses a flag defined twice in one process (e.g. a test run).
  flags.DEFINE_string("workdir", None, "The training run's workdir.")
  flags.DEFINE_string("output", None, "Where to write the metrics JSON; pictures go beside it.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest complete one.")
  flags.DEFINE_string("split", None, "Evaluation split; default the config's data.eval_split.")
  flags.DEFINE_integer("num_images", None, "Evaluate the first N images (all processes together); "
                       "default the whole split.")
  flags.DEFINE_integer("fit_geometry_steps", 0, "GaussianToken: fit each image's geometry to it in this many "
                       "Adam steps at encode time (gaussiantoken_jax.geometry_fit); 0: the embedder's geometry.")


def config_name(config) -> str:
  """A short name for the run's setting, e.g. "gaussiantoken-demo-32px" or "vq-cifar10-32px"."""
  dataset = config.data.name if config.data.source == "tfds" else config.data.source
  return f"{config.model.type}-{dataset}-{config.data.image_size}px"


def write_outputs(output: pathlib.Path, record: dict, pictures: dict) -> list[pathlib.Path]:
  """Writes the JSON record and the pictures (`<stem>_<name>.png`); returns the picture paths."""
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
  paths = []
  for name, picture in pictures.items():
    path = output.with_name(f"{output.stem}_{name}.png")
    Image.fromarray(picture).save(path)
    paths.append(path)
  return paths


def run(workdir: str, output: str | pathlib.Path, *, step: int | None = None, split: str | None = None,
        num_images: int | None = None, inception_weights: str | None = None, with_fid: bool = True,
        fit_geometry_steps: int = 0, batch_size: int | None = None) -> dict:
  """Evaluates checkpoint `step` of `workdir` and writes `output` and the pictures (process 0); returns the
  record written (see the module docstring; without `with_fid`, no Inception network and no rfid / kid).
  `batch_size`: images per evaluation batch, all processes together (default: the run's `data.eval_batch_size`,
  or its `batch_size`)."""
  restored = restore.restore_model(workdir, step)
  config = restored.config
  logging.info("Restored the EMA weights of step %d from %s.", restored.step, workdir)
  loader_config = config
  if batch_size is not None:
    loader_config = config.copy_and_resolve_references()
    loader_config.data.eval_batch_size = batch_size
  eval_batch = loader_config.data.eval_batch_size or loader_config.batch_size
  sharding.check_batch_size("the evaluation batch (--batch_size; default the run's)", eval_batch, restored.steps.mesh)
  loader = data.make_eval_loader(loader_config, split=split)
  evaluator = evaluator_lib.Evaluator(restored.steps, losses.load_lpips_params(config.loss.lpips_weights_path),
                                      inception.load_inception_params(inception_weights) if with_fid else None,
                                      fit_geometry_steps=fit_geometry_steps)
  metrics, pictures = evaluator.evaluate(restored.params, restored.model_state, loader, max_images=num_images)
  # A metric that is undefined (rFID of one image) is null: JSON has no NaN.
  metrics = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in metrics.items()}
  record = {**metrics, "fit_geometry_steps": fit_geometry_steps, "step": restored.step,
            "batch_size": eval_batch,
            "config_name": config_name(config),
            "split": split or config.data.eval_split, "workdir": str(workdir), "config": config.to_dict()}
  if jax.process_index() == 0:
    paths = write_outputs(pathlib.Path(output), record, pictures)
    logging.info("Wrote %s and %s.", output, ", ".join(map(str, paths)))
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required.")
  if FLAGS.num_images is not None and FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images must be a positive int, got {FLAGS.num_images}.")
  if FLAGS.fit_geometry_steps < 0:
    raise app.UsageError(f"--fit_geometry_steps must be a non-negative int, got {FLAGS.fit_geometry_steps}.")
  distributed.initialize_from_env()
  record = run(FLAGS.workdir, FLAGS.output, step=FLAGS.step, split=FLAGS.split, num_images=FLAGS.num_images,
               inception_weights=cli_flags.INCEPTION_WEIGHTS.value, fit_geometry_steps=FLAGS.fit_geometry_steps,
               batch_size=cli_flags.BATCH_SIZE.value)
  if jax.process_index() == 0:
    print(json.dumps({key: record[key] for key in (*evaluator_lib.METRIC_KEYS, "fit_geometry_steps", "step",
                                                    "config_name")
                      if key in record}))


if __name__ == "__main__":
  _define_flags()
  flags.adopt_module_key_flags(cli_flags)  # --batch_size and --inception_weights in --helpshort
  command_line.run(main)
