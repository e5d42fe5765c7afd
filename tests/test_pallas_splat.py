"""Pallas splat kernels against the XLA path: values, all four gradients, lowering, dispatch.

Twin classes as in JAX's Pallas op tests: the base class runs the compiled kernel and needs its platform
(GPU or TPU); the subclass with INTERPRET = True runs the same tests through the Pallas interpreter on any
platform. The XLA path is itself checked against a float64 NumPy formula and finite differences in
tests/test_splatting.py.

Tolerance: both sides compute in float32; each output or gradient element is a sum of at most K * H * W
products, so the difference is a few float32 roundings (6e-8) times the sum's length in the worst case and
its square root typically; 1e-5 of the norm covers these shapes (K <= 130, H * W <= 384) with margin.
"""
import base64
import dataclasses
import functools
import itertools
import json
import re
import subprocess
import sys

import jax
from jax.experimental import pallas as pl
from jax.extend.mlir import ir as mlir_ir
from jaxlib.mosaic.python import tpu as mosaic_tpu
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax import losses, splat, splatting
from gaussiantoken_jax.train import sharding
from gaussiantoken_jax.train import step as step_lib
from pallas_kernels import splat as pallas_splat
from runs import REPO, load_demo_config

CUTOFF = 1.0 / 255.0
NAMES = ("means", "rotations", "scales", "features")

# (B, K, H, W, C). GPU blocks: 16-64 Gaussians x 32-64 pixels; TPU blocks: 128 Gaussians x 128 pixels (256 pixels
# when a map has more than 128).
SHAPES = [
    (2, 37, 5, 7, 3),  # K, H * W and C all off the block multiples
    (1, 1, 4, 4, 1),  # one Gaussian, one channel, the smallest map
    (2, 20, 9, 6, 17),  # non-square map; C = 17 pads to 32 on GPU
    (1, 130, 17, 16, 2),  # two TPU blocks of Gaussians and of pixels, to exercise the accumulation
]


def random_gaussians(seed, b, k, c):
  rng = np.random.default_rng(seed)
  means = rng.uniform(-1.1, 1.1, (b, k, 2))  # some centres just off the map
  means[:, 3::7] = rng.choice([-6.0, 6.0], size=means[:, 3::7].shape)  # every 7th Gaussian far outside it
  rotations = rng.uniform(-4.0, 4.0, (b, k))
  scales = rng.uniform(0.4, 3.0, (b, k, 2))
  features = rng.normal(size=(b, k, c))
  return tuple(a.astype(np.float32) for a in (means, rotations, scales, features))


# Lowering the Triton kernels for CUDA without a GPU: JAX 0.11 reads the GPU's kind (its compute capability) from
# the context mesh's devices, and a CPU mesh has none ("No supported GPU devices found"). These tests therefore
# trace and lower on meshes of abstract H100s, which JAX 0.10 accepts too.
ABSTRACT_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


def abstract_gpu_mesh(shape=(1,), axis_names=("batch",)):
  return jax.sharding.AbstractMesh(shape, axis_names, (jax.sharding.AxisType.Auto,) * len(shape),
                                   abstract_device=ABSTRACT_GPU)


def lower_for_cuda(fn, args, mesh=None):
  """`jax.jit(fn)` traced on `args` and lowered for CUDA, both with `mesh` (one abstract GPU by default) in context
  (the lowering reads the GPU's kind from the context of the trace)."""
  with jax.sharding.use_abstract_mesh(abstract_gpu_mesh() if mesh is None else mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


@functools.lru_cache(maxsize=None)
def value_and_grads(h, w, c, impl, **kwargs):
  """jit of (out, grads of sum(cotangent * out)) for one map size; `impl` is "xla" or a kernel variant."""
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=(h, w, c)), jnp.float32)
  if impl == "xla":
    f = functools.partial(pallas_splat.splat_xla, height=h, width=w, cutoff=CUTOFF)
  else:
    f = functools.partial(pallas_splat.splat, height=h, width=w, cutoff=CUTOFF, backend=impl, **kwargs)

  def loss(*args):
    out = f(*args)
    return jnp.sum(cotangent * out), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


class TestSplatGpu:
  BACKEND = "gpu"
  INTERPRET = False

  def setup_method(self):
    if not self.INTERPRET and jax.default_backend() != self.BACKEND:
      pytest.skip(f"the compiled {self.BACKEND} kernel needs a {self.BACKEND}; the Interpret twin runs here")

  def run(self, shape, seed=0, **kwargs):
    b, k, h, w, c = shape
    args = random_gaussians(seed, b, k, c)
    (_, out), grads = value_and_grads(h, w, c, self.BACKEND, interpret=self.INTERPRET, **kwargs)(*args)
    return args, out, grads

  def check_against_xla(self, shape, **kwargs):
    args, out, grads = self.run(shape, **kwargs)
    b, _, h, w, c = shape
    (_, want_out), want_grads = value_and_grads(h, w, c, "xla")(*args)
    assert out.shape == (b, h, w, c) and out.dtype == jnp.float32
    assert relative_error(out, want_out) < 1e-5
    for name, g, want in zip(NAMES, grads, want_grads):
      assert g.shape == want.shape, name
      assert relative_error(g, want) < 1e-5, f"{name}: relative error {relative_error(g, want):.2e}"
    # Gaussians far outside the map cover no pixel: they neither add to the map nor receive gradient.
    for g in grads:
      np.testing.assert_array_equal(np.asarray(g)[:, 3::7], 0.0)

  @pytest.mark.parametrize("shape", SHAPES)
  def test_forward_and_gradients_match_xla_path(self, shape):
    self.check_against_xla(shape)

  @pytest.mark.parametrize("shape", SHAPES)
  def test_scalar_loops_match_xla_path(self, shape):
    """A thread per pixel or Gaussian instead of tiles (GPU only); blocks of 32, off the shapes' multiples."""
    self.check_against_xla(shape, block_sizes=pallas_splat.BlockSizes(
        32, 32, pl.next_power_of_2(shape[-1]), scalar_loops=True))

  @pytest.mark.parametrize("shape", SHAPES)
  def test_culled_tiles_match_xla_path(self, shape):
    """cull_rows (GPU only) with the default tile: the sorted Gaussians' gradients back in the caller's order."""
    _, k, h, w, c = shape
    blocks = dataclasses.replace(pallas_splat.BlockSizes.for_shape(k, h * w, c, "gpu"), cull_rows=True)
    self.check_against_xla(shape, block_sizes=blocks)

  def test_culling_skips_tiles_and_matches_xla_path(self):
    """Small Gaussians on a tall map in small tiles, where most tiles are skipped (the fraction is checked, so that
    the test exercises the skipping); the centres reach 5% past the map's edges."""
    b, k, h, w, c = 2, 70, 48, 8, 3
    rng = np.random.default_rng(3)
    args = tuple(a.astype(np.float32) for a in (
        rng.uniform(-1.05, 1.05, (b, k, 2)), rng.uniform(-4.0, 4.0, (b, k)), rng.uniform(0.3, 1.2, (b, k, 2)),
        rng.normal(size=(b, k, c))))
    blocks = pallas_splat.BlockSizes(16, 32, 16, cull_rows=True)
    fractions = pallas_splat.computed_tile_fraction(*args[:3], height=h, width=w, cutoff=CUTOFF, block_sizes=blocks)
    assert max(fractions) < 0.5, fractions
    (_, out), grads = value_and_grads(h, w, c, self.BACKEND, interpret=self.INTERPRET, block_sizes=blocks)(*args)
    (_, want_out), want_grads = value_and_grads(h, w, c, "xla")(*args)
    assert relative_error(out, want_out) < 1e-5
    for name, g, want in zip(NAMES, grads, want_grads):
      assert relative_error(g, want) < 1e-5, f"{name}: relative error {relative_error(g, want):.2e}"

  def test_culling_at_the_last_row_and_past_the_last_gaussian_block(self):
    """Two edge cases of the culled ranges (`_block_ranges`), on an 8 x 4 map in 16-pixel (4-row) blocks, 16-Gaussian
    blocks. Sorted by centre row: 20 small Gaussians in rows 0-3, 16 in rows 4-7, and last one centred a row below
    the map whose band is row 7 alone. The bottom pixel block's range then starts at sorted Gaussian 20 and must
    run 2 blocks to reach Gaussian 36: (1) the band of the map's last row counts (leaving it out ends the range at
    Gaussian 35, one block); (2) the second block reads sorted Gaussians 36-51, past the 48 of the K blocks, which
    the extra block of `padded_k` keeps in bounds (without it the read is shifted back onto Gaussians 32-35 by the
    interpreter, or out of bounds on a GPU)."""
    b, k, h, w, c = 1, 37, 8, 4, 2
    rng = np.random.default_rng(9)
    rows = np.concatenate([rng.uniform(0.5, 2.5, 20), rng.uniform(5.5, 7.5, 16), [h + 0.5]])  # centre rows, pixels
    means = np.stack([rng.uniform(-0.9, 0.9, k), rows / h * 2 - 1], -1)
    # Scales <= 0.5 px keep each band within 1.67 rows of its centre (rho = sqrt(2 ln 255) = 3.33).
    scales = rng.uniform(0.3, 0.5, (k, 2))
    order = rng.permutation(k)  # the caller's order is not the sorted one
    args = tuple(a[None, order].astype(np.float32) for a in (means, rng.uniform(-4.0, 4.0, k), scales,
                                                              rng.normal(size=(k, c))))
    blocks = pallas_splat.BlockSizes(16, 16, 16, cull_rows=True)
    (_, out), grads = value_and_grads(h, w, c, self.BACKEND, interpret=self.INTERPRET, block_sizes=blocks)(*args)
    (_, want_out), want_grads = value_and_grads(h, w, c, "xla")(*args)
    assert np.abs(np.asarray(want_out)[0, -1]).max() > 0.1  # the last row holds weight
    assert relative_error(out, want_out) < 1e-5
    for name, g, want in zip(NAMES, grads, want_grads):
      assert relative_error(g, want) < 1e-5, f"{name}: relative error {relative_error(g, want):.2e}"

  def test_bfloat16_inputs_are_computed_in_float32(self):
    """The op casts its inputs to float32 before the geometry (its docstring); computed in bfloat16, the centres and
    1/s (2^-9 relative) would move the weights by percents. The oracle: the XLA path on the same rounded values."""
    b, k, h, w, c = 1, 9, 5, 4, 3
    args = [jnp.asarray(a, jnp.bfloat16) for a in random_gaussians(11, b, k, c)]
    got = pallas_splat.splat(*args, height=h, width=w, cutoff=CUTOFF, backend=self.BACKEND, interpret=self.INTERPRET)
    want = pallas_splat.splat_xla(*(jnp.asarray(a, jnp.float32) for a in args), height=h, width=w, cutoff=CUTOFF)
    assert got.dtype == jnp.float32 and relative_error(got, want) < 1e-5

  def test_xla_backward_pass_equals_kernel_backward(self):
    _, _, grads = self.run(SHAPES[0], seed=1)
    _, _, want = self.run(SHAPES[0], seed=1, backward_pass_impl="xla")
    for name, g, w in zip(NAMES, grads, want):
      assert relative_error(g, w) < 1e-5, name


class TestSplatGpuInterpret(TestSplatGpu):
  INTERPRET = True


class TestSplatTpu(TestSplatGpu):
  BACKEND = "tpu"
  # GPU kernel options, which the TPU kernel does not have.
  test_scalar_loops_match_xla_path = test_culled_tiles_match_xla_path = None
  test_culling_skips_tiles_and_matches_xla_path = test_culling_at_the_last_row_and_past_the_last_gaussian_block = None


class TestSplatTpuInterpret(TestSplatTpu):
  INTERPRET = True


def test_public_splat_pallas_interpret_keeps_dtype_and_matches_xla():
  means, rotations, scales, features = random_gaussians(3, 2, 9, 4)
  f16 = jnp.asarray(features, jnp.bfloat16)
  got = splat(means, rotations, scales, f16, height=6, width=5, impl="pallas_interpret")
  want = splat(means, rotations, scales, f16, height=6, width=5, impl="xla")
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 6, 5, 4)
  # Same float32 sums on both paths, then one bfloat16 rounding (relative 2^-8) of the output.
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)


def test_the_train_step_lowers_for_gpus_with_the_kernel_on_each_devices_images():
  """The whole `:runlocal` train step, traced for a mesh of 8 GPUs (abstract ones, as the steps are traced on a
  mesh: `sharding.traced_on`), takes the kernel (`impl="auto"` reads the mesh's platform) and lowers for CUDA with
  the forward and backward kernels inside `shard_map` at the local batch (8 images / 8 devices)."""
  config = load_demo_config("runlocal")
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices("cpu")))
  gpus = abstract_gpu_mesh(tuple(steps.mesh.shape.values()), steps.mesh.axis_names)

  def on_gpus(tree, spec=None):  # the shapes, dtypes and partitioning of `tree`, on the GPU mesh
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.NamedSharding(
        gpus, leaf.sharding.spec if spec is None else spec)), tree)

  dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)  # LPIPS's parameter shapes, with no weights to fetch (offline too)
  lpips_params = jax.eval_shape(lambda: losses.LPIPS().init(jax.random.key(0), dummy, dummy)["params"])
  args = (on_gpus(steps.abstract_state), on_gpus(steps.abstract_batch(config.batch_size)),
          on_gpus(lpips_params, jax.sharding.PartitionSpec()))
  text = lower_for_cuda(functools.partial(step_lib.train_step, steps), args, gpus).as_text()
  assert [int(x) for x in re.findall(r"triton.*?grid_x = (\d+)", text)] == [config.batch_size // 8] * 2
  assert text.count("sdy.manual_computation") == 2


def test_the_interpreter_needs_no_triton(monkeypatch):
  """A JAX release without the Triton lowering loses the compiled GPU kernels only (module docstring)."""
  monkeypatch.setattr(pallas_splat, "pltriton", None)
  args = random_gaussians(8, 2, 9, 3)
  got = splat(*args, height=5, width=6, impl="pallas_interpret")
  assert relative_error(got, splat(*args, height=5, width=6, impl="xla")) < 1e-5
  assert splatting._resolve("auto", "gpu") == ("xla", None)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"impl='pallas' needs a GPU with the Pallas Triton lowering"):
    splatting._resolve("pallas", "gpu")  # pylint: disable=protected-access


@pytest.mark.parametrize("backend, platform, target, blocks", [
    ("gpu", "cuda", "xla.gpu.triton", None),
    ("gpu", "cuda", "xla.gpu.triton", pallas_splat.BlockSizes(32, 64, 16, num_stages=3, tf32x3=False)),  # IEEE dots
    ("gpu", "cuda", "xla.gpu.triton", pallas_splat.BlockSizes(128, 128, 8, scalar_loops=True)),
    ("gpu", "cuda", "xla.gpu.triton", pallas_splat.BlockSizes(32, 32, 16, cull_rows=True)),
    ("tpu", "tpu", "tpu_custom_call", None)])
def test_forward_and_backward_lower_without_hardware(backend, platform, target, blocks):
  b, k, h, w, c = 3, 70, 9, 13, 5
  args = [jnp.zeros(s, jnp.float32) for s in [(b, k, 2), (b, k), (b, k, 2), (b, k, c)]]

  def loss(*a):
    out = pallas_splat.splat(*a, height=h, width=w, cutoff=CUTOFF, backend=backend, block_sizes=blocks)
    return jnp.sum(out ** 2)

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  lowered = (lower_for_cuda(grad, args) if platform == "cuda" else
             jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)))
  calls = [line for line in lowered.as_text().splitlines() if "custom_call" in line]
  assert len(calls) == 2 and all(target in line for line in calls), calls  # the forward and the backward kernel


def _mosaic_kernels(lowered_text):
  """The Mosaic modules of a TPU lowering's tpu_custom_calls, as MLIR text."""
  modules = []
  for config in re.findall(r'tpu_custom_call.*?backend_config = "(.*?)"', lowered_text):
    body = base64.b64decode(json.loads(config.replace("\\22", '"'))["custom_call_config"]["body"])
    with mlir_ir.Context() as context:
      # The TPU dialect for its attributes; the serialized ops are named "stable_mosaic.*", which no dialect
      # registers, so they are read in the generic form.
      mosaic_tpu.register_dialect(context)
      context.allow_unregistered_dialects = True
      modules.append(str(mlir_ir.Module.parse(body)))
  return modules


def test_the_tpu_kernels_accumulate_on_one_core_in_float32():
  """What the interpreter cannot show, read from the lowered Mosaic kernels: the last grid axis, the one each kernel
  sums over (Gaussian blocks forward, pixel blocks backward), is "arbitrary", so one core owns each output block
  while it accumulates (one marked "parallel" may be split between a megacore's two cores, each writing back its
  own partial sums over the other's), and every product is float32 (`contract_precision<fp32>`; a default-precision
  dot is one bfloat16 pass on the MXU, errors near 1e-3 against the XLA path)."""
  b, k, h, w, c = 1, 5, 4, 4, 2
  args = [jnp.zeros(s, jnp.float32) for s in [(b, k, 2), (b, k), (b, k, 2), (b, k, c)]]

  def loss(*a):
    return jnp.sum(pallas_splat.splat(*a, height=h, width=w, cutoff=CUTOFF, backend="tpu") ** 2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  kernels = _mosaic_kernels(text)
  assert len(kernels) == 2  # the forward and the backward
  semantics = ", ".join(f"#tpu.dimension_semantics<{s}>" for s in ("parallel", "parallel", "arbitrary"))
  for kernel, num_products in zip(kernels, (1, 2)):
    assert f"dimension_semantics = [{semantics}]" in kernel
    products = [line for line in kernel.splitlines() if "tpu.matmul" in line]
    assert len(products) == num_products and all("precision = #tpu.contract_precision<fp32>" in p for p in products)


def test_on_a_batch_split_mesh_each_device_splats_its_own_images():
  """Under a mesh in context (`sharding.traced_on`, as every jitted step of the project is traced), the kernel
  runs inside `shard_map`: values and gradients equal the XLA path's on the 8 host devices (interpreter), and
  the GPU lowering's Triton calls have a grid of the local batch (B / 8 images), not the global one."""
  mesh = sharding.make_mesh(dict(data=4, fsdp=2), jax.devices("cpu"))  # the 8 host devices, also on a GPU machine
  batch_sharding = sharding.batch_sharding(mesh)
  b, k, h, w, c = 16, 37, 9, 7, 5
  args = [jax.device_put(a, batch_sharding) for a in random_gaussians(4, b, k, c)]
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(b, h, w, c)), jnp.float32)

  def value_and_grads_of(impl):
    def loss(*a):
      return jnp.sum(cotangent * splat(*a, height=h, width=w, impl=impl))
    return jax.jit(sharding.traced_on(mesh, jax.value_and_grad(loss, argnums=(0, 1, 2, 3))))

  (value, grads), (want_value, want_grads) = (value_and_grads_of(impl)(*args) for impl in ("pallas_interpret", "xla"))
  assert relative_error(value, want_value) < 1e-5
  for name, got, want in zip(NAMES, grads, want_grads):
    assert got.sharding.spec == batch_sharding.spec, name
    assert relative_error(got, want) < 1e-5, name

  gpus = abstract_gpu_mesh(tuple(mesh.shape.values()), mesh.axis_names)  # the same mesh of (abstract) GPUs

  def triton_grids(context_mesh):
    def loss(*a):
      kernel = functools.partial(pallas_splat.splat, height=h, width=w, cutoff=CUTOFF, backend="gpu")
      return jnp.sum(splatting._split_over_context_mesh(kernel, b)(*a) ** 2)  # pylint: disable=protected-access
    on_mesh = jax.sharding.NamedSharding(context_mesh, batch_sharding.spec) if context_mesh.size > 1 else None
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_mesh) for a in args]
    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), abstract, context_mesh).as_text()
    return [int(x) for x in re.findall(r"triton.*?grid_x = (\d+)", text)]

  assert triton_grids(gpus) == [b // mesh.size] * 2  # forward, backward
  assert triton_grids(abstract_gpu_mesh()) == [b] * 2  # one device in context: the whole batch


@pytest.mark.parametrize("impl, platform, want", [
    ("auto", "cpu", ("xla", None)), ("auto", "gpu", ("pallas", "gpu")), ("auto", "tpu", ("pallas", "tpu")),
    ("pallas", "tpu", ("pallas", "tpu")), ("pallas_interpret", "cpu", ("pallas_interpret", "gpu")),
    ("pallas_interpret", "tpu", ("pallas_interpret", "tpu")), ("xla", "gpu", ("xla", None)),
])
def test_dispatch(impl, platform, want):
  assert splatting._resolve(impl, platform) == want  # pylint: disable=protected-access


def test_pallas_on_cpu_is_a_clear_error():
  with pytest.raises(ValueError, match=r"impl='pallas' needs a GPU .* or a TPU, got the 'cpu' platform"):
    splatting._resolve("pallas", "cpu")  # pylint: disable=protected-access


@pytest.mark.parametrize("bad, match", [
    (dict(backend="cuda"), r"`backend` must be one of \('gpu', 'tpu'\)"),
    (dict(backward_pass_impl="jax"), r"`backward_pass_impl` must be one of"),
    (dict(backend="tpu", block_sizes=pallas_splat.BlockSizes(128, 128, 8, cull_rows=True)),
     r"cull_rows is a GPU kernel option")])
def test_bad_options_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    pallas_splat.splat(*random_gaussians(0, 1, 2, 1), height=4, width=4, cutoff=CUTOFF, **bad)


def test_default_tiles_meet_the_hardware_rules():
  """`BlockSizes.for_shape` against the rules of its docstring, which the interpreter does not enforce (it runs any
  tile) and the lowering without hardware does not check: GPU (Triton) tiles are powers of 2 and the products'
  operands at least 16 wide, so the channels pad to max(16, next power of 2); TPU (Mosaic) blocks are multiples
  of (8, 128), with the Gaussians and pixels on the 128 lanes and the channels on the 8 sublanes."""
  for k, p, c in itertools.product([1, 16, 17, 33, 130], [1, 128, 129, 257, 1024], [1, 3, 8, 16, 17, 64]):
    gpu = pallas_splat.BlockSizes.for_shape(k, p, c, "gpu")
    assert gpu.block_c == max(16, 2 ** int(np.ceil(np.log2(c)))), (k, p, c)
    assert min(gpu.block_k, gpu.block_p) >= 16 and not (gpu.scalar_loops or gpu.cull_rows), (k, p, c)
    tpu = pallas_splat.BlockSizes.for_shape(k, p, c, "tpu")
    assert tpu.block_k % 128 == tpu.block_p % 128 == tpu.block_c % 8 == 0 and not tpu.cull_rows, (k, p, c)


def test_culling_and_scalar_loops_together_or_bad_sizes_are_clear_errors():
  with pytest.raises(ValueError, match=r"cull_rows applies to the tile kernels only.*scalar_loops=True"):
    pallas_splat.BlockSizes(32, 32, 16, scalar_loops=True, cull_rows=True)
  for fields, match in (((0, 32, 16), r"`block_k` must be a positive int, got 0"),
                        ((32, 48, 16), r"`block_p` must be a power of 2 \(Triton's tiles and warps\), got 48"),
                        ((32, 32, 16.0), r"`block_c` must be a positive int, got 16.0"),
                        ((True, 32, 16), r"`block_k` must be a positive int, got True")):
    with pytest.raises(ValueError, match=match):
      pallas_splat.BlockSizes(*fields)
  with pytest.raises(ValueError, match=r"`num_warps` must be a power of 2"):
    pallas_splat.BlockSizes(32, 32, 16, num_warps=3)


@pytest.mark.parametrize("cutoff", [CUTOFF, 0.3, 0.0])
def test_row_spans_hold_every_row_a_gaussian_reaches(cutoff):
  """`_row_spans` against float64 NumPy from (means, rotations, scales), not from the kernels' geometry rows.

  Sound: every pixel row where a Gaussian's weight at some pixel centre reaches the cutoff lies in its band.
  Tight: the band is the rows whose centre is within rho sqrt(Sigma_yy) of the Gaussian's centre (the line
  y = row centre meets the ellipse w >= cutoff), Sigma = R diag(s)^2 R^T, with at most the slack's rounding.
  """
  b, k, h, w = 3, 50, 23, 11
  means, rotations, scales, _ = (np.asarray(a, np.float64) for a in random_gaussians(2, b, k, 1))
  scales = scales / 2  # bands shorter than the map, so that both ends are checked
  blocks = pallas_splat.BlockSizes(16, 32, 16, cull_rows=True)
  layout, geom, _ = pallas_splat._operands(  # pylint: disable=protected-access
      means, rotations, scales, np.zeros((b, k, 1)), height=h, width=w, cutoff=cutoff, backend="gpu",
      interpret=True, backward_pass_impl="pallas", block_sizes=dataclasses.replace(blocks, cull_rows=False))
  lo, hi = (np.asarray(a)[:, :k] for a in pallas_splat._row_spans(geom, layout))  # pylint: disable=protected-access

  cx, cy = (means[..., 0] + 1) * w / 2, (means[..., 1] + 1) * h / 2
  px, py = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)  # [H, W]
  cos, sin = np.cos(rotations), np.sin(rotations)
  rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # R, [B, K, 2, 2]
  sigma = rot @ (scales[..., :, None] ** 2 * np.swapaxes(rot, -1, -2))
  d = np.stack([px[None, None] - cx[..., None, None], py[None, None] - cy[..., None, None]], -1)  # [B, K, H, W, 2]
  quad = np.einsum("bkhwi,bkij,bkhwj->bkhw", d, np.linalg.inv(sigma), d)
  reached = np.exp(-0.5 * quad).max(axis=-1) >= cutoff  # [B, K, H]
  rows = np.arange(h)
  inside = (rows >= lo[..., None]) & (rows <= hi[..., None])
  assert not np.any(reached & ~inside), "a row with weight at the cutoff is outside its band"
  if cutoff == 0.0:  # every weight counts: no culling
    assert inside.all()
    return
  assert reached.any() and (~inside).any()  # both sides of the check are exercised
  offset = np.abs(rows + 0.5 - cy[..., None])
  half = np.sqrt(-2 * np.log(cutoff) * sigma[..., 1, 1])[..., None]
  clear = np.abs(offset - half) > 0.01  # rows not within the slack of the band's edge
  np.testing.assert_array_equal(inside[clear], (offset <= half)[clear])


def test_pallas_kernels_is_a_leaf_package():
  code = ("import sys, pallas_kernels.splat, pallas_kernels.splat_tpu; "
          "print(sorted(m for m in sys.modules if m.startswith('gaussiantoken_jax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"


def test_the_splat_benchmark_computes_the_xla_weights_in_every_repeat(monkeypatch):
  """benchmarks/splat_bench.py times chains of repeats (10; 3 here, to compile less); a chain whose geometry stayed
  the same let XLA compute the XLA path's weights once for all, which the Pallas call cannot do (one exponential
  in the program)."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import splat_bench  # pylint: disable=import-outside-toplevel  # a script's module, on sys.path only here
  args = splat_bench.make_inputs((2, 5, 4, 4, 3))
  for name, fn in splat_bench.passes("xla", 4, 4, repeats=3).items():
    text = fn.lower(*args).compile().as_text()
    assert len(re.findall(r"exponential\(", text)) == fn.repeats, name
