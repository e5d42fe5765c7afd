"""`python -m gaussiantoken_jax.main` and the other commands refuse bad command lines with one clear message and a
non-zero exit."""
import os
import pathlib
import subprocess
import sys

import pytest

from gaussiantoken_jax import command_line, weights

REPO = pathlib.Path(__file__).resolve().parents[1]


# Errors about the input, the library's and the config file's own, are one line (`command_line.run`).
@pytest.mark.parametrize("command, args, message", [
    ("main", ["--config=configs/demo.py:runlocal"], "--workdir is required to train"),
    # The line ends there: no config field is called that, so no hint.
    ("main", ["--config=configs/demo.py:runlocal", "--workdir=W", "--nonsense=1"],
     "Unknown command line flag 'nonsense'\nPass --helpshort"),
    ("main", ["--config=configs/demo.py:runlocal", "--workdir=W", "--total_steps=4"],
     "Unknown command line flag 'total_steps' (a config field is set as --config.total_steps)"),
    ("main", ["--config=configs/no_such_config.py:runlocal", "--workdir=W"],
     "--config: no config file at 'configs/no_such_config.py'"),
    ("main", ["--config=configs/demo.py:bogus", "--workdir=W"], "Unknown config variant 'bogus'"),
    ("main", ["--config=configs/demo.py:runlocal", "--workdir=W", "--config.model.codebok_size=1"],
     "no such config field 'codebok_size' Did you mean \"codebook_size\""),
    ("main", ["--config=configs/demo.py:runlocal", "--workdir=W", "--config.batch_size=12"],
     "config.batch_size=12: the global batch must be a multiple of the 8 devices"),
    ("tokenize", ["--workdir=W", "--data=W/photos", "--output=W/t.npz"], "no such image folder or .tar"),
    ("tokenize", ["--workdir=W", "--data=W/photos", "--output=W/t.npz", "--batch_size=0"],
     "--batch_size=0: 0 is not a positive integer"),
    ("evaluate", ["--workdir=W", "--output=W/e.json"], "does not exist"),
], ids=["no_workdir", "unknown_flag", "config_field_as_flag", "missing_config_file", "unknown_variant",
        "misspelt_field", "batch_not_split_evenly",
        "tokenize_missing_data", "tokenize_zero_batch", "evaluate_missing_run"])
def test_bad_command_lines_exit_nonzero_with_a_clear_message(command, args, message, tmp_path):
  args = [arg.replace("=W", f"={tmp_path / 'run'}") for arg in args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", f"gaussiantoken_jax.{command}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr + result.stdout
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()  # nothing is written for a refused command line


# The flags shared by the commands (`cli_flags`) are defined for all of them; those a command has no use for are
# refused rather than silently ignored.
@pytest.mark.parametrize("command, args", [
    ("gaussiantoken_jax.tokenize", ["--workdir=W", "--data=W", "--output=W/t.npz", "--inception_weights=x.npz"]),
    ("gaussiantoken_jax.data.inspect", ["--data=demo", "--inception_weights=x.npz"]),
], ids=["tokenize", "data_inspect"])
def test_commands_refuse_shared_flags_they_do_not_use(command, args, tmp_path):
  args = [arg.replace("=W", f"={tmp_path / 'run'}") for arg in args]
  result = subprocess.run([sys.executable, "-m", command, *args], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert f"{command.removeprefix('gaussiantoken_jax.')} does not use --inception_weights" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_input_errors_become_one_line_and_other_errors_keep_their_traceback(monkeypatch):
  """In-process, with absl's `app.run` reduced to calling main: what `command_line.run` turns into "Error: message"
  (SystemExit with that text, exit status 1) is the library's errors about its input, as its comment lists them: a
  bad argument or config, a missing file or folder, weights that cannot be fetched, a run that diverged. A bug's
  error passes through with its traceback."""
  monkeypatch.setattr(command_line.app, "run", lambda main, flags_parser: main(["command"]))
  input_errors = (ValueError, FileNotFoundError, NotADirectoryError, weights.WeightsUnavailableError,
                  FloatingPointError)
  for error in (*input_errors, RuntimeError, KeyError):
    def main(argv, error=error):
      raise error("what was wrong")
    if error in input_errors:
      with pytest.raises(SystemExit) as exited:
        command_line.run(main)
      assert exited.value.code == "Error: what was wrong", error
    else:
      with pytest.raises(error):
        command_line.run(main)


def test_the_config_field_hint_names_fields_only():
  """`_is_config_field`, which decides the "(a config field is set as --config.X)" hint: nested fields count; a name
  past a leaf (`total_steps.x`) is none, not a TypeError from looking inside an int."""
  is_field = command_line._is_config_field  # pylint: disable=protected-access
  assert is_field("total_steps") and is_field("model.codebook_size")
  assert not any(is_field(name) for name in ("nonsense", "model.codebok_size", "total_steps.x"))
