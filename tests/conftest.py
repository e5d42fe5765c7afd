"""Test-wide setup: 8 host CPU devices, the CPU platform, and JAX's persistent compilation cache.

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


@pytest.fixture(scope="session")
def runlocal_run(tmp_path_factory):
  """(workdir, exit code) of the demo's `:runlocal` trained through the command line (tests/runs.py), one run
  for the whole session: under pytest-xdist the workers share it through the directory above their own."""
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent
  return runs.shared_run(root)
