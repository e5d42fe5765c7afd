"""Test-wide setup: 8 host CPU devices and JAX's persistent compilation cache.

Both must be set before JAX is imported anywhere, which is why they live here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gaussiantoken_jax/jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
