"""Running a command (`main`, `evaluate`, `fid`, `tokenize`, `data.inspect`): the library's errors about its input
reach the user as one line and exit status 1, not as a traceback through absl and the library."""
import sys

from absl import app
from absl import logging

from gaussiantoken_jax.weights import WeightsUnavailableError

# What the library raises for a bad argument, path, file or config; the messages name what was expected and what
# was received. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, WeightsUnavailableError)


def run(main) -> None:
  """`absl.app.run(main)`, with INPUT_ERRORS printed as "Error: message"; `--verbosity=1` logs the traceback too,
  for when one of them comes from a bug rather than from the input."""

  def main_reporting_input_errors(argv):
    try:
      return main(argv)
    except INPUT_ERRORS as err:
      logging.debug("Where the error below was raised:", exc_info=True)
      sys.exit(f"Error: {err}")

  app.run(main_reporting_input_errors)
