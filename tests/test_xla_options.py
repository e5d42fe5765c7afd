"""xla_options: on the CPU the project's programs leave convolutions to XLA's own emitter and keep YNNPACK's dots
and reductions; elsewhere they get no options."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gaussiantoken_jax import splat, xla_options
from gaussiantoken_jax.models import conv
from gaussiantoken_jax.train import sharding
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


def test_low_precision_programs_leave_every_convolution_to_xla():
  """A max-pool and the two convolutions after it (VGG16's pattern): the CPU options still let YNNPACK take the
  convolutions into the reduction's fusion (XLA:CPU 0.11 then returned NaN in bfloat16, the module docstring); the
  options for bfloat16 and float16 convolutions, YNNPACK's dots alone, leave them to XLA."""
  assert xla_options.compiler_options(conv_dtype="float32") == xla_options.CPU_OPTIONS
  for dtype in (jnp.bfloat16, "float16"):
    assert xla_options.compiler_options(conv_dtype=dtype) == xla_options.LOW_PRECISION_CPU_OPTIONS

  def pool_then_two_convs(x, w):
    h = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    for _ in range(2):
      h = jax.nn.relu(lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return h

  x, w = jnp.ones((2, 32, 32, 32), jnp.bfloat16), jnp.ones((3, 3, 32, 32), jnp.bfloat16)  # smaller: no fusion
  assert ynn_fused_opcodes(_compiled_text(pool_then_two_convs, x, w, options=xla_options.CPU_OPTIONS))[
      "convolution"] == 1
  assert ynn_fused_opcodes(_compiled_text(pool_then_two_convs, x, w,
                                          options=xla_options.LOW_PRECISION_CPU_OPTIONS))["convolution"] == 0


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_other_platforms_get_no_options(monkeypatch, backend):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert xla_options.compiler_options() is None


def test_a_cpu_mesh_gets_the_cpu_options_whatever_the_default_backend(monkeypatch):
  """The mesh's devices decide, not the default backend: the CPU programs of a GPU machine (e.g. a CPU evaluation
  mesh) still get the CPU options, and a caller that edits the dict it got does not change the next caller's."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  options = xla_options.compiler_options(sharding.make_mesh(dict(data=1, fsdp=1), jax.devices("cpu")[:1]))
  assert options == xla_options.CPU_OPTIONS
  options["xla_cpu_experimental_ynn_fusion_type"] = "edited by a caller"
  monkeypatch.undo()
  assert xla_options.compiler_options()["xla_cpu_experimental_ynn_fusion_type"].startswith("LIBRARY_FUSION_TYPE")


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
  monkeypatch.setattr(xla_options, "compiler_options", lambda mesh=None, conv_dtype=None: {"xla_no_such_option": "1"})
  square = xla_options.jit(lambda x: x * x)
  x = jnp.arange(3.0)
  assert jnp.array_equal(jax.jit(lambda x: square(x) + 1.0)(x), x * x + 1.0)
  assert jnp.array_equal(jax.grad(lambda x: square(x).sum())(x), 2.0 * x)
  with pytest.raises(Exception, match="xla_no_such_option"):
    square(x)
  # One traced argument among concrete ones, or a traced keyword argument, is still a call inside a trace.
  multiply, two = xla_options.jit(lambda a, b: a * b), jnp.full(3, 2.0)  # `two` made here: a concrete array
  assert jnp.array_equal(jax.jit(lambda x: multiply(x, two))(x), 2.0 * x)
  assert jnp.array_equal(jax.jit(lambda x: multiply(a=two, b=x))(x), 2.0 * x)


def test_the_platform_is_the_context_meshs_so_a_cpu_mesh_on_a_gpu_machine_gets_the_cpu_forms(monkeypatch):
  """On a GPU machine (the default backend patched to "gpu") a program traced for a mesh of CPU devices reads "cpu":
  the CPU convolution forms apply and splat(impl="auto") takes the XLA path, not the GPU kernel, which would fail to
  compile for the CPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  mesh = sharding.make_mesh(dict(data=8, fsdp=1), jax.devices("cpu"))
  assert xla_options.platform() == "gpu"
  seen = []

  def program(means, rotations, scales, features):
    seen.append((xla_options.platform(), conv._simple_cpu_conv(  # pylint: disable=protected-access
        jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), ((1, 1), (1, 1)), None, None, ("NHWC", "HWIO", "NHWC"), 1, 1)))
    return splat(means, rotations, scales, features, height=5, width=4, impl="auto")

  rng = np.random.default_rng(0)
  args = [jnp.asarray(a, jnp.float32) for a in (rng.uniform(-1, 1, (8, 3, 2)), rng.uniform(-3, 3, (8, 3)),
                                                 rng.uniform(0.5, 2, (8, 3, 2)), rng.normal(size=(8, 3, 2)))]
  got = jax.jit(sharding.traced_on(mesh, program))(*args)
  assert seen == [("cpu", True)]
  np.testing.assert_array_equal(got, jax.jit(functools.partial(splat, height=5, width=4, impl="xla"))(*args))
