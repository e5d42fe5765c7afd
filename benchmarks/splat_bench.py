r"""Splat forward and forward+backward time, XLA path against the Pallas kernel.

    python benchmarks/splat_bench.py [--shapes=cifar,imagenet,large] [--impls=xla,pallas] [--rounds=5]

Shapes (B, K, H, W, C): cifar (256, 64, 16, 16, 3), imagenet (64, 256, 32, 32, 8), large (32, 1024, 64, 64,
64). `--impls` defaults to xla and pallas on GPU/TPU, xla alone elsewhere. Each row is the median over
`--rounds` rounds of the mean time per op of back-to-back jitted calls (about 0.2 s of calls a round, after
two warm-up calls), each call a chain of 10 dependent ops (`chained`) so that JAX's host dispatch does not
set the time; "fwd+bwd" is one op returning the output and the gradients of all four inputs for a given
cotangent (jax.vjp).

What the floors count, per pass, independent of implementation (padding and recomputation are the
implementation's cost, not the floor's):
  bytes: fwd reads the inputs, B*K*(5+C) float32, and writes the output, B*H*W*C; fwd+bwd adds reading the
    cotangent (B*H*W*C), reading the inputs again and writing their gradients (2*B*K*(5+C)).
  operations, per Gaussian-pixel pair: one weight costs 14 (offset 2, rotate-and-scale 6, square-sum 3,
    times -0.5 1, exp 1, cutoff 1) and the product 2C in the forward; the backward recomputes the weight
    (14), forms dL/dw (2C), the feature gradient (2C) and the six geometry sums (13): 41 + 6C for fwd+bwd.
The memory floor is bytes over the copy bandwidth measured here (x + 1 over 1 GiB on GPU, 64 MiB else); the
compute floor is operations over the device's float32 (non-tensor-core) peak from its datasheet, when
known. "%mem" and "%flop" are floor time over measured time.
"""
from __future__ import annotations

import functools
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from gaussiantoken_jax import splat

SHAPES = {"cifar": (256, 64, 16, 16, 3), "imagenet": (64, 256, 32, 32, 8), "large": (32, 1024, 64, 64, 64)}
# Datasheet float32 (CUDA-core / VPU) peaks, FLOP/s, by device_kind substring, the first match wins (the PCIe
# H100 before the SXM one, whose device_kind names its memory, e.g. "NVIDIA H100 80GB HBM3").
FP32_PEAK = {"H200": 67e12, "H100 PCIe": 51.2e12, "H100": 67e12, "A100": 19.5e12, "RTX 3090": 35.6e12,
             "RTX 4090": 82.6e12}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to run, from {list(SHAPES)}.")
_IMPLS = flags.DEFINE_list("impls", None, "splat impls to time (default: xla, plus pallas on GPU/TPU).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per row; the median is reported.")


def chained(fn, repeats: int = 10):
  """jit of `fn` applied `repeats` times in a chain, each call's inputs depending on the previous output.

  Timing one op per jitted call measures JAX's host dispatch (tens of microseconds) at the small shapes;
  the chain keeps the device busy. The dependency (1e-30 times the sum of every output, added to every
  argument) stops XLA from merging the repeats and changes no value. It sums whole outputs: linking on one
  element let XLA prune the other elements' work from the intermediate repeats of the XLA path (one
  feature-gradient product left of ten). And it feeds every argument: linking on the features alone left the
  geometry the same in each repeat, and XLA computed the XLA path's [K, H*W] weights once for all ten (one
  `exponential` in the compiled chain instead of ten), which the Pallas call cannot do. The sums read each
  output once more, the same for every impl.
  """

  def run(*args):
    for _ in range(repeats):
      out = fn(*args)
      link = 1e-30 * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(out))
      args = tuple(a + link for a in args)
    return out

  run.repeats = repeats
  return jax.jit(run)


def time_call(fn, *args, rounds: int) -> float:
  """Median over rounds of the mean seconds per op of back-to-back calls of a `chained` function."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, min(1000, int(0.2 / max(time.perf_counter() - start, 1e-6))))
  samples = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls / fn.repeats)
  return statistics.median(samples)


def copy_bandwidth(rounds: int) -> float:
  """Bytes/s of x + 1 (one read, one write) on a large float32 array, one op per call: a chain of them would
  fuse into one read and one write (10x too fast), and at 1 GiB dispatch time is negligible."""
  n = (1 << 28) if jax.default_backend() == "gpu" else (1 << 24)
  x = jnp.zeros((n,), jnp.float32)

  def add_one(a):
    return a + 1.0

  add_one.repeats = 1
  return 2 * 4 * n / time_call(jax.jit(add_one), x, rounds=rounds)


def floors(shape):
  """(bytes, operations) for the fwd and fwd+bwd passes, as the module docstring counts them."""
  b, k, h, w, c = shape
  inputs, output, pairs = 4 * b * k * (5 + c), 4 * b * h * w * c, b * k * h * w
  return {"fwd": (inputs + output, pairs * (14 + 2 * c)),
          "fwd+bwd": (3 * inputs + 2 * output, pairs * (41 + 6 * c))}


def make_inputs(shape, seed=0, scales=(0.5, 3.0)):
  """Random Gaussians (centres on the map, scales uniform in `scales` pixels), features and a cotangent."""
  b, k, h, w, c = shape
  rng = np.random.default_rng(seed)
  arrays = (rng.uniform(-1, 1, (b, k, 2)), rng.uniform(-3, 3, (b, k)), rng.uniform(*scales, (b, k, 2)),
            rng.normal(size=(b, k, c)), rng.normal(size=(b, h, w, c)))
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def passes(impl, h, w, repeats: int = 10):
  f = functools.partial(splat, height=h, width=w, impl=impl)

  def fwd_bwd(means, rotations, scales, features, cotangent):
    out, vjp = jax.vjp(f, means, rotations, scales, features)
    return out, vjp(cotangent)

  return {"fwd": chained(lambda *a: f(*a[:4]), repeats), "fwd+bwd": chained(fwd_bwd, repeats)}


def main(argv):
  del argv
  device = jax.devices()[0]
  impls = _IMPLS.value or (["xla", "pallas"] if jax.default_backend() in ("gpu", "tpu") else ["xla"])
  bandwidth = copy_bandwidth(_ROUNDS.value)
  peak = next((v for key, v in FP32_PEAK.items() if key in device.device_kind), None)
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; measured copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; float32 peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s")
  header = (f"{'shape':<9} {'B,K,H,W,C':<18} {'pass':<8} {'impl':<7} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8} "
            f"{'%mem':>6} {'%flop':>6} {'vs ' + impls[0]:>7}")
  print(header)
  for name in _SHAPES.value:
    shape = SHAPES[name]
    args = make_inputs(shape)
    fns = {impl: passes(impl, shape[2], shape[3]) for impl in impls}
    for pass_name, (nbytes, ops) in floors(shape).items():
      base = None
      for impl in impls:
        seconds = time_call(fns[impl][pass_name], *args, rounds=_ROUNDS.value)
        base = base or seconds
        flop_pct = f"{100 * ops / peak / seconds:6.1f}" if peak else f"{'-':>6}"
        print(f"{name:<9} {','.join(map(str, shape)):<18} {pass_name:<8} {impl:<7} {seconds * 1e3:9.3f} "
              f"{nbytes / seconds / 1e9:7.1f} {ops / seconds / 1e9:8.0f} "
              f"{100 * nbytes / bandwidth / seconds:6.1f} {flop_pct} {base / seconds:6.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
