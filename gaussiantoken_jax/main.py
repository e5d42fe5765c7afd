r"""Command line: train and evaluate a tokenizer, or describe the model with --dry_run.

  python -m gaussiantoken_jax.main --config=configs/demo.py --workdir=/tmp/gt_demo
  python -m gaussiantoken_jax.main --config=configs/imagenet.py --dry_run

Only flags live here; the work is done by library functions a notebook can call as well.
"""
import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from gaussiantoken_jax import command_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:runlocal].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures; an existing "
                               "run in it is resumed.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model, print its overview and a JSON summary, and exit "
                             "without touching a workdir.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # config_flags loads the file lazily and would report a missing one as two chained tracebacks.
  config_file = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]  # drop ":variants"
  if not os.path.isfile(config_file):
    raise app.UsageError(f"--config: no config file at {config_file!r} (relative to {os.getcwd()!r}); expected "
                         "e.g. --config=configs/demo.py[:runlocal] from the repository root.")
  if _DRY_RUN.value:
    from gaussiantoken_jax import overview  # pylint: disable=import-outside-toplevel
    text, summary = overview.dry_run(_CONFIG.value)
    print(text)
    print(json.dumps(summary))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required to train (or pass --dry_run).")
  from gaussiantoken_jax.train import trainer  # pylint: disable=import-outside-toplevel
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  command_line.run(main)
