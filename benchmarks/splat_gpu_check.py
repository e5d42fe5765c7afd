"""One-shot GPU check of the Pallas splat kernel, in three modes, and a table that needs no GPU.

    python benchmarks/splat_gpu_check.py check     # versions, correctness, the deprecation warning
    python benchmarks/splat_gpu_check.py sweep     # the XLA path and kernel variants at three shapes
    python benchmarks/splat_gpu_check.py profile   # one fwd+bwd of three variants, to run under ncu
    python benchmarks/splat_gpu_check.py tiles     # the fraction of tiles each sweep variant computes (any machine)

check prints the JAX version and device, then for each shape the relative error (norm of the difference over
norm of the XLA value) of the kernel's output and of the gradients of all four inputs, and fails (exit 1) above
1e-5. Last, it checks that JAX 0.11's Triton deprecation warning stays out of the log while
pallas_kernels.splat is imported, and that it is JAX's to emit (shown once the filters are reset).
sweep times the XLA path and kernel variants (tiles, scalar loops, culling: `SWEEP`) at the ImageNet, CIFAR and
large shapes, each variant with its error against the XLA path and the fraction of tiles it computes; the ImageNet
shape also with Gaussians as small as trained ones. profile runs the forward and backward of the default tile, the
scalar loops and the culled tiles once at the ImageNet shape, for `ncu -k regex:splat`. All three are run by
benchmarks/splat_gpu_check.sh; a dry run off GPU: `python benchmarks/splat_gpu_check.py check pallas_interpret 3`.
"""
import dataclasses
import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from splat_bench import chained, make_inputs, time_call  # this folder is the script's, so on sys.path

from gaussiantoken_jax import splat
from pallas_kernels import splat as pallas_splat

SHAPES = [(2, 37, 5, 7, 3), (1, 1, 4, 4, 1), (3, 300, 17, 23, 17), (256, 64, 16, 16, 3), (64, 256, 32, 32, 8),
          (4, 1024, 64, 48, 64)]


def grads_and_out(impl, shape, args, cotangent):
  _, _, h, w, _ = shape
  f = functools.partial(splat, height=h, width=w, impl=impl)

  def run(*a):
    out, vjp = jax.vjp(f, *a)
    return out, vjp(cotangent)

  return jax.jit(run)(*args)


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# The demo checkpoint's trained Gaussians have scales of 0.88-0.96 pixels (docs/benchmarks.md); the benchmark's
# random ones 0.5-3.0, whose wider bands leave culling less to skip.
BENCH_SCALES, TRAINED_SCALES = (0.5, 3.0), (0.85, 0.95)
SWEEP = {  # (shape, scale range) -> BlockSizes fields that differ from the default tile's; {} is the default
    ((64, 256, 32, 32, 8), BENCH_SCALES): [
        {}, dict(cull_rows=True), dict(cull_rows=True, block_k=32), dict(cull_rows=True, block_p=32),
        dict(scalar_loops=True, block_k=128, block_p=128, block_c=8),
        dict(scalar_loops=True, block_k=64, block_p=128, block_c=8, num_warps=2)],
    ((64, 256, 32, 32, 8), TRAINED_SCALES): [{}, dict(cull_rows=True), dict(cull_rows=True, block_k=32)],
    ((256, 64, 16, 16, 3), BENCH_SCALES): [
        {}, dict(cull_rows=True, block_k=32), dict(cull_rows=True, block_k=16),
        dict(scalar_loops=True, block_k=64, block_p=64, block_c=4, num_warps=2)],
    ((32, 1024, 64, 64, 64), BENCH_SCALES): [{}, dict(cull_rows=True)],
}
# The default tile, the scalar loops and the culled tiles at the ImageNet shape.
PROFILE_SHAPE = (64, 256, 32, 32, 8)
PROFILE_VARIANTS = [{}, dict(scalar_loops=True, block_k=128, block_p=128, block_c=8), dict(cull_rows=True)]


def fwd_bwd_of(f):
  def fwd_bwd(*a):
    out, vjp = jax.vjp(f, *a[:4])
    return out, vjp(a[4])
  return fwd_bwd


def kernel_of(shape, changes):
  _, k, h, w, c = shape
  blocks = dataclasses.replace(pallas_splat.BlockSizes.for_shape(k, h * w, c, "gpu"), **changes)
  return blocks, functools.partial(pallas_splat.splat, height=h, width=w, cutoff=1 / 255, block_sizes=blocks)


def block_sweep(shape, scales, variants):
  """fwd and fwd+bwd ms of the kernel variants (the default marked *), each with its worst relative error
  against the XLA path over the output and the gradients, and the fraction of tiles it computes."""
  *args, cotangent = make_inputs(shape, scales=scales)
  _, _, h, w, _ = shape
  xla = functools.partial(splat, height=h, width=w, impl="xla")
  want = jax.jit(fwd_bwd_of(xla))(*args, cotangent)
  print(f"kernel variants at {shape}, scales {scales}; the XLA path: "
        f"fwd {time_call(chained(xla), *args, rounds=3) * 1e3:.4f} ms, "
        f"fwd+bwd {time_call(chained(fwd_bwd_of(xla)), *args, cotangent, rounds=3) * 1e3:.4f} ms", flush=True)
  for changes in variants:
    blocks, f = kernel_of(shape, changes)
    try:
      got = jax.jit(fwd_bwd_of(f))(*args, cotangent)
      error = max(relative_error(g, v) for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
      fwd = time_call(chained(f), *args, rounds=3)
      both = time_call(chained(fwd_bwd_of(f)), *args, cotangent, rounds=3)
    except Exception as e:  # pylint: disable=broad-except  # a variant that fails to compile is a result too
      print(f" {blocks}: failed, {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    tiles = pallas_splat.computed_tile_fraction(*args[:3], height=h, width=w, cutoff=1 / 255, block_sizes=blocks)
    print(f"{'*' if not changes else ' '}{blocks}: fwd {fwd * 1e3:.4f} ms, fwd+bwd {both * 1e3:.4f} ms, "
          f"worst rel. error {error:.1e}, tiles computed: fwd {tiles[0]:.2f}, bwd {tiles[1]:.2f}", flush=True)


def profile():
  """One fwd+bwd of each PROFILE_VARIANTS kernel after a compile that runs nothing: ncu sees 2 kernels each."""
  args = make_inputs(PROFILE_SHAPE)
  for changes in PROFILE_VARIANTS:
    blocks, f = kernel_of(PROFILE_SHAPE, changes)
    compiled = jax.jit(fwd_bwd_of(f)).lower(*args).compile()
    print(f"profiling {blocks}", flush=True)
    jax.block_until_ready(compiled(*args))
  return 0


def check(impl="pallas", num_shapes=len(SHAPES)):
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; devices {jax.devices()}", flush=True)
  worst = 0.0
  for shape in SHAPES[:num_shapes]:
    b, k, h, w, c = shape
    rng = np.random.default_rng(0)
    means = rng.uniform(-1.1, 1.1, (b, k, 2))
    means[:, 3::7] = 6.0  # far outside the map
    arrays = (means, rng.uniform(-4, 4, (b, k)), rng.uniform(0.4, 3.0, (b, k, 2)), rng.normal(size=(b, k, c)))
    args = [jnp.asarray(a, jnp.float32) for a in arrays]
    cotangent = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    out, grads = grads_and_out(impl, shape, args, cotangent)
    want_out, want_grads = grads_and_out("xla", shape, args, cotangent)
    errors = [relative_error(out, want_out)] + [relative_error(g, v) for g, v in zip(grads, want_grads)]
    worst = max(worst, *errors)
    print(f"{str(shape):<26} rel. error out {errors[0]:.1e}  d means {errors[1]:.1e}  d rotations "
          f"{errors[2]:.1e}  d scales {errors[3]:.1e}  d features {errors[4]:.1e}", flush=True)

  with warnings.catch_warnings(record=True) as caught:
    jax.jit(functools.partial(splat, height=9, width=9, impl=impl)).lower(*[a[:1, :5] for a in args])
  hidden = sum("Triton backend is deprecated" in str(x.message) for x in caught)
  with warnings.catch_warnings(record=True) as caught:
    warnings.resetwarnings()
    warnings.simplefilter("always")
    jax.jit(functools.partial(splat, height=9, width=10, impl=impl)).lower(*[a[:1, :5] for a in args])
  shown = sum("Triton backend is deprecated" in str(x.message) for x in caught)
  print(f"Triton deprecation warnings: {hidden} with pallas_kernels' filter, {shown} with filters reset")
  print(f"worst relative error {worst:.1e}: {'PASS' if worst < 1e-5 else 'FAIL'}")
  return 0 if worst < 1e-5 and hidden == 0 else 1


def tiles():
  """The fraction of tiles each SWEEP variant computes on the sweep's inputs: no timing, any machine."""
  for (shape, scales), variants in SWEEP.items():
    *args, _ = make_inputs(shape, scales=scales)
    _, _, h, w, _ = shape
    for changes in variants:
      blocks, _ = kernel_of(shape, changes)
      fwd, bwd = pallas_splat.computed_tile_fraction(*args[:3], height=h, width=w, cutoff=1 / 255,
                                                     block_sizes=blocks)
      print(f"{str(shape):<22} scales {str(scales):<12} {str(changes):<70} tiles computed: fwd {fwd:.2f}, "
            f"bwd {bwd:.2f}")
  return 0


def sweep():
  for (shape, scales), variants in SWEEP.items():
    block_sweep(shape, scales, variants)
  return 0


if __name__ == "__main__":
  mode, *rest = sys.argv[1:] or ["check"]
  if mode == "check":
    sys.exit(check(rest[0], int(rest[1])) if rest else check())
  sys.exit({"sweep": sweep, "profile": profile, "tiles": tiles}[mode]())
