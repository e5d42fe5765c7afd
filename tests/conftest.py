"""Test-wide setup: 8 host CPU devices, the CPU platform, JAX's persistent compilation cache, and the order in
which pytest-xdist hands out the test files.

All must be set before JAX is imported anywhere, which is why they live here. The suite runs on the CPU even on
a GPU machine (its sharding tests need the 8 host devices); the compiled-kernel tests of
tests/test_pallas_splat.py run there with `JAX_PLATFORMS=cuda,cpu python -m pytest tests/test_pallas_splat.py`.
"""
import os

# Appended, not set: a user's own XLA_FLAGS (e.g. dump options) must survive.
_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import runs  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gaussiantoken_jax/jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The files that take longest, in the order to start them. The suite runs with `--dist loadfile
# --no-loadscope-reorder` (README, "Tests"): pytest-xdist hands each file as a whole to the next free worker, in
# collection order, so a module's fixtures and the programs its tests share are built once, and the two
# two-process tests, which compile the same programs, run one after the other. Longest first keeps one worker
# from finishing alone at the end; test_tokenizer.py comes first because it starts the shared training run
# (`runlocal_run`) that test_trainer.py also waits for, while the other worker runs the two-process tests.
# Measured warm seconds per file: docs/benchmarks.md, "The test suite".
_LONGEST_FIRST = ("test_tokenizer.py", "test_multiprocess.py", "test_train_step.py", "test_trainer.py",
                  "test_learning.py", "test_benchmarks.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(scope="session")
def runlocal_run(tmp_path_factory):
  """(workdir, exit code) of the demo's `:runlocal` trained through the command line (tests/runs.py), one run
  for the whole session: under pytest-xdist the workers share it through the directory above their own."""
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent
  return runs.shared_run(root)
