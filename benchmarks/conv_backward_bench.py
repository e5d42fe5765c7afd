r"""The three convolutions of a 3x3 conv layer's training step, against a float32 matmul of the same run.

    python benchmarks/conv_backward_bench.py [--batch_size=8] [--calls=15] [--xla_defaults]

For each 3x3 convolution shape of the CIFAR encoder and decoder (`configs/cifar10.py`: 128 channels at 32x32,
256 at 16x16, the 3-channel input and output layers), times the forward pass, the input gradient and the
kernel gradient, each as its own jitted program (`lax.conv_general_dilated` and its `jax.vjp`, as
`models.conv.Conv` runs these shapes on every backend), and prints each as a fraction of the median GFLOP/s of a
2048^3 float32 matmul timed between them (the machine's load moves both). Medians over `--calls` calls.
Compiled with the project's options (`xla_options`), or with `--xla_defaults` with XLA's.

Why: `benchmarks/train_step_bench.py` puts the encoder and decoder forwards at 84-87% of that peak and their
forward + backward passes at 55-58% (docs/benchmarks.md); this shows which of the backward's convolutions is slow.

A second table times the input gradient inside a loop: `--loop_steps` gradient steps w.r.t. the input (x <- x -
0.001 dL/dx with L = sum |conv(x, w)|) as a `lax.scan` and unrolled, with autodiff's input gradient of
`lax.conv_general_dilated` and with `models.conv`'s (its kernel HWIO, which XLA:CPU runs through its fast
convolution inside a loop body too; models/conv.py).
"""
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax import lax

from gaussiantoken_jax import xla_options
from gaussiantoken_jax.models import conv as conv_lib

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch of every convolution.")
_CALLS = flags.DEFINE_integer("calls", 15, "Timed calls per program (median).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 10, "Gradient steps of the loop table.")
_XLA_DEFAULTS = flags.DEFINE_bool("xla_defaults", False, "Compile with XLA's default options instead of the "
                                  "project's (`xla_options`: on the CPU, no YNNPACK convolutions).")

# (height = width, input channels, output channels) of the CIFAR config's 3x3 convolutions.
SHAPES = ((32, 128, 128), (16, 256, 256), (16, 128, 256), (32, 3, 128), (32, 128, 3))
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _jit(fn):
  return jax.jit(fn, compiler_options=None if _XLA_DEFAULTS.value else xla_options.compiler_options())


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(_CALLS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul_gflops = []

  def timed(fn, *args):
    matmul_gflops.append(2 * 2048 ** 3 / _median_seconds(matmul, a) / 1e9)
    return _median_seconds(fn, *args)

  rows, loops = [], []
  for size, c_in, c_out in SHAPES:
    x = jax.random.normal(jax.random.key(0), (_BATCH_SIZE.value, size, size, c_in))
    w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out)) * 0.05
    dy = jax.random.normal(jax.random.key(2), (_BATCH_SIZE.value, size, size, c_out))
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)  # noqa: E731
    programs = {
        "forward": _jit(conv),
        "input gradient": _jit(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
        "kernel gradient": _jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
    }
    gflop = 2 * _BATCH_SIZE.value * size * size * 9 * c_in * c_out / 1e9  # the same for all three
    rows.append((f"{size}x{size}, {c_in} -> {c_out}", gflop, {name: timed(fn, x, w) for name, fn in programs.items()}))
    if c_in == c_out:  # the loop's state is the input map: the layer must keep its shape
      loops.append((rows[-1][0], {name: _median_seconds(fn, x, w) for name, fn in _loop_programs().items()}))

  peak = statistics.median(matmul_gflops)
  options = "XLA's defaults" if _XLA_DEFAULTS.value else f"options {xla_options.compiler_options()}"
  print(f"jax {jax.__version__}, {jax.default_backend()}, {options}; matmul 2048^3 float32: {peak:.0f} GFLOP/s "
        f"(median of {len(matmul_gflops)}, range {min(matmul_gflops):.0f}-{max(matmul_gflops):.0f})")
  print(f"| 3x3 conv, batch {_BATCH_SIZE.value} | GFLOP | forward ms (%peak) | input grad ms (%peak) | "
        "kernel grad ms (%peak) |")
  print("|---|---:|---:|---:|---:|")
  for name, gflop, times in rows:
    cells = " | ".join(f"{t * 1e3:.1f} ({gflop / t / peak * 100:.0f}%)" for t in times.values())
    print(f"| {name} | {gflop:.2f} | {cells} |")
  print(f"\n| 3x3 conv, batch {_BATCH_SIZE.value}, {_LOOP_STEPS.value} input-gradient steps | "
        + " | ".join(f"{name} ms" for name in loops[0][1]) + " | scan, autodiff / scan, models.conv |")
  print("|---|" + "---:|" * (len(loops[0][1]) + 1))
  for name, times in loops:
    cells = " | ".join(f"{t * 1e3:.0f}" for t in times.values())
    print(f"| {name} | {cells} | {times['scan, autodiff'] / times['scan, models.conv']:.2f}x |")


def _loop_programs():
  """{form: jitted (x, w) -> x after `--loop_steps` input-gradient steps}, for both convolutions and loop forms."""
  def stepped(conv, unroll):
    def run(x, w):
      def step(x, _):
        return x - 1e-3 * jax.grad(lambda x: jnp.sum(jnp.abs(conv(x, w))))(x), None
      return lax.scan(step, x, None, length=_LOOP_STEPS.value, unroll=unroll)[0]
    return _jit(run)

  forms = {"autodiff": lax.conv_general_dilated, "models.conv": conv_lib.conv_general_dilated}
  return {f"{loop}, {name}": stepped(lambda x, w, f=f: f(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC),
                                     unroll)
          for loop, unroll in (("scan", 1), ("unrolled", True)) for name, f in forms.items()}


if __name__ == "__main__":
  app.run(main)
