"""Subprocess runs for the tests: the training command line, several JAX processes on one machine, and the one
trained `configs/demo.py:runlocal` run that the trainer, tokenizer and evaluation tests share.

Every subprocess gets the suite's JAX compilation cache, so a program compiled by one run is loaded by the next.
The processes of a multi-process run are started through this file (`python tests/runs.py -m MODULE ...` or
`python tests/runs.py SCRIPT ...`), which lets every one of them write that cache
(`write_compile_cache_from_every_process`).
"""
import fcntl
import importlib.util
import json
import os
import pathlib
import runpy
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds for one run; 2 shared CPU cores
SHARED_STEPS, SHARED_EVERY = 8, 2  # the shared run trains 8 steps, logging and checkpointing every 2
SHARED_FIT_STEPS = 5  # and evaluates at the end a second time with the geometry fitted in 5 steps


def subprocess_env(num_devices=8, process_id=0, num_processes=1, port=None):
  """This process's environment with `num_devices` host devices, the suite's compilation cache, and the
  coordinator variables of `launch/multiprocess_local.sh` when `num_processes` > 1."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache/gaussiantoken_jax/jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  if num_processes > 1:
    env.update(GAUSSIANTOKEN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", GAUSSIANTOKEN_NUM_PROCESSES=str(num_processes),
               GAUSSIANTOKEN_PROCESS_ID=str(process_id))
  return env


def start_run(workdir, *overrides, log_path):
  """Starts `python -m gaussiantoken_jax.main` on `configs/demo.py:runlocal` (no evaluation unless overridden)."""
  command = [sys.executable, "-m", "gaussiantoken_jax.main", "--config=configs/demo.py:runlocal",
             f"--workdir={workdir}", "--config.eval_every_steps=1000", *overrides]
  log = open(log_path, "a")  # pylint: disable=consider-using-with  (closed when the process is waited for)
  return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT), log


def finish(process_and_log, timeout=TIMEOUT):
  """Waits for a run of `start_run` (killing it after `timeout`); returns its exit code."""
  process, log = process_and_log
  try:
    return process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
    log.close()


def wait_for(condition, process, timeout=TIMEOUT, what=""):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"the run exited ({process.returncode}) before {what}")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.1)


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def load_demo_config(arg):
  spec = importlib.util.spec_from_file_location("configs_demo", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(num_processes, make_command, tmp_path, name, num_devices=8):
  """Starts `num_processes` processes of `make_command(process_id)` (`[sys.executable, ...]`) sharing
  `num_devices` host devices, each through this file (module docstring); returns (return codes, outputs)."""
  port = free_port()
  logs = [open(tmp_path / f"{name}_{i}.log", "w") for i in range(num_processes)]  # pylint: disable=consider-using-with
  commands = [make_command(i) for i in range(num_processes)]
  assert all(command[0] == sys.executable for command in commands), commands
  procs = [subprocess.Popen([sys.executable, __file__, *command[1:]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=subprocess_env(num_devices // num_processes, i, num_processes, port))
           for i, (command, log) in enumerate(zip(commands, logs))]
  try:
    codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
  finally:
    for proc, log in zip(procs, logs):
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  return codes, [(tmp_path / f"{name}_{i}.log").read_text() for i in range(num_processes)]


def shared_run(root: pathlib.Path):
  """`configs/demo.py:runlocal` trained SHARED_STEPS steps in `root/runlocal_run`, once for all callers.

  pytest-xdist workers pass the directory their temporary directories share: the first one to take the lock
  trains, the others wait and reuse it. Returns (workdir, exit code); callers only read the workdir.
  """
  workdir, code_file = root / "runlocal_run", root / "runlocal_run.returncode"
  with open(root / "runlocal_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not code_file.exists():
      workdir.mkdir()
      returncode = finish(start_run(workdir, f"--config.total_steps={SHARED_STEPS}",
                                    f"--config.checkpoint_every_steps={SHARED_EVERY}",
                                    f"--config.log_every_steps={SHARED_EVERY}",
                                    f"--config.eval_fit_geometry_steps={SHARED_FIT_STEPS}",
                                    log_path=workdir / "log.txt"))
      code_file.write_text(str(returncode))
  return workdir, int(code_file.read_text())


def write_compile_cache_from_every_process() -> None:
  """Lets this process write JAX's persistent compilation cache whatever its process index.

  JAX writes cache entries from process 0 only (`jax._src.compiler._cache_write`, sparing shared filesystems
  concurrent writes), and on the CPU each process's programs have their own cache keys, so process 1 of a
  2-process test compiled all its programs afresh in every run: 60 s of the 2-process step test's 90 s when run
  alone, 13 s once it may write its own entries. Private JAX API: where it has moved this does nothing, and the
  tests only run slower.
  """
  try:
    from jax._src import compiler, distributed  # pylint: disable=import-outside-toplevel
    write, state = compiler._cache_write, distributed.global_state  # pylint: disable=protected-access
    _ = state.process_id
  except (ImportError, AttributeError):
    return

  def write_as_process_0(*args, **kwargs):
    saved, state.process_id = state.process_id, 0
    try:
      return write(*args, **kwargs)
    finally:
      state.process_id = saved

  compiler._cache_write = write_as_process_0  # pylint: disable=protected-access


if __name__ == "__main__":
  # A process of `run_processes`: run the module (-m) or script as `python` would, after the cache patch.
  write_compile_cache_from_every_process()
  if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
  else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
