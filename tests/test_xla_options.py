"""xla_options: on the CPU the project's programs leave convolutions to XLA's own emitter and keep YNNPACK's dots
and reductions; elsewhere they get no options."""
import logging

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from gaussiantoken_jax import xla_options
from hlo import ynn_fused_opcodes


def _compiled_text(fn, *args, options):
  return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def test_cpu_options_take_convolutions_from_ynnpack_and_leave_it_dots_and_reductions():
  assert jax.default_backend() == "cpu"
  options = xla_options.compiler_options()
  assert options == xla_options.CPU_OPTIONS
  x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # smaller ones YNNPACK leaves to XLA anyway
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # XLA's defaults give the convolution to YNNPACK (the check can see it); the options do not.
  assert ynn_fused_opcodes(_compiled_text(conv, x, w, options=None))["convolution"] == 1
  assert ynn_fused_opcodes(_compiled_text(conv, x, w, options=options))["convolution"] == 0
  a = jnp.ones((64, 64))  # one program each: YNNPACK fuses a dot into the reduction that consumes it
  assert ynn_fused_opcodes(_compiled_text(lambda a: a @ a, a, options=options))["dot"] == 1
  assert ynn_fused_opcodes(_compiled_text(lambda a: jnp.tanh(a).sum(axis=0), a, options=options))["reduce"] == 1


def test_other_platforms_get_no_options(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_options.compiler_options() is None


def test_a_refused_option_falls_back_to_the_defaults_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"})
  xla_options._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access
  try:
    with caplog.at_level(logging.WARNING):
      assert xla_options.compiler_options() is None
    assert "This XLA refuses the CPU compile options" in caplog.text and "NO_SUCH_FUSION_TYPE" in caplog.text
  finally:
    xla_options._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access


def test_a_mesh_that_is_not_a_mesh_is_refused():
  with pytest.raises(ValueError, match="`mesh` must be a jax.sharding.Mesh or None, got list"):
    xla_options.compiler_options(jax.devices())


def test_jit_compiles_with_the_options_at_top_level_and_plainly_inside_a_callers_trace(monkeypatch):
  """An option XLA refuses makes visible which path ran: a top-level call must fail on it, a call inside a caller's
  jit or grad must not see it (JAX would raise ValueError for compiler_options on a nested jit)."""
  monkeypatch.setattr(xla_options, "compiler_options", lambda mesh=None: {"xla_no_such_option": "1"})
  square = xla_options.jit(lambda x: x * x)
  x = jnp.arange(3.0)
  assert jnp.array_equal(jax.jit(lambda x: square(x) + 1.0)(x), x * x + 1.0)
  assert jnp.array_equal(jax.grad(lambda x: square(x).sum())(x), 2.0 * x)
  with pytest.raises(Exception, match="xla_no_such_option"):
    square(x)
