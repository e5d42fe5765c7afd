"""Running a command (`main`, `evaluate`, `fid`, `tokenize`, `data.inspect`): the library's errors about its input
reach the user as one line and exit status 1, not as a traceback through absl and the library."""
import re
import sys

from absl import app
from absl import flags
from absl import logging

from gaussiantoken_jax import config_lib
from gaussiantoken_jax.weights import WeightsUnavailableError

# What the library raises for a bad argument, path, file or config, and for a training run that diverged; the
# messages name what was expected and what was received. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, WeightsUnavailableError, FloatingPointError)


def run(main) -> None:
  """`absl.app.run(main)`, with INPUT_ERRORS printed as "Error: message"; `--verbosity=1` logs the traceback too,
  for when one of them comes from a bug rather than from the input."""

  def main_reporting_input_errors(argv):
    try:
      return main(argv)
    except INPUT_ERRORS as err:
      logging.debug("Where the error below was raised:", exc_info=True)
      sys.exit(f"Error: {err}")

  app.run(main_reporting_input_errors, flags_parser=_parse_flags)


def _is_config_field(name: str) -> bool:
  node = config_lib.base_config()
  for part in name.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _parse_flags(argv):
  """absl's flag parsing, except that an error raised by a config file itself (e.g. an unknown `:variant`), which
  ml_collections reports with that file's whole traceback, is shown as its first line and the error's last line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = f"{lines[0]} {lines[-1]}" if "Traceback (most recent call last):" in lines else str(err)
    unknown = re.match(r"Unknown command line flag '([\w.]+)'", message)
    if unknown and "config" in flags.FLAGS and _is_config_field(unknown.group(1)):
      message += f" (a config field is set as --config.{unknown.group(1)})"
  except (AttributeError, KeyError) as err:  # a --config.FIELD override naming no field: ml_collections' error
    detail = err
    while isinstance(detail, BaseException) and detail.args:  # its text is a KeyError's inside an AttributeError
      detail = detail.args[0]
    overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    message = f"no such config field {' '.join(str(detail).split())} (overrides given: {', '.join(overrides)})"
  sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.")
