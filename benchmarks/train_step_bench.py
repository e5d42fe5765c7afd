r"""Steady-state train step and encode throughput, against a float32 matmul measured in the same run.

    python benchmarks/train_step_bench.py --config=configs/cifar10.py --batch_size=8
        [--steps=12] [--encode_batch_size=64] [--rounds=7] [--parts=true] [--lpips=true]

What it times, all through the project's own code (`train.step.make_steps` on the mesh of
`config.mesh`, the jitted and donated train step the trainer runs), on synthetic uint8 batches of the
config's image size (no data is read):
  step        one generator + discriminator step with `loss.lpips_weight = 0` (LPIPS skipped), and the same
              step with LPIPS in the loss (the config's weight, or 1.0 where the config has 0): median over
              `--steps` steps after compilation and two warm-up steps (the first runs the codebook's k-means),
              the two variants alternating step by step;
  encode      images -> tokens (`model.encode`, train=False, EMA parameters), median over `--rounds` calls at
              `--encode_batch_size`;
  matmul      a 2048^3 matmul in float32 (8192^3 in bfloat16 on GPU/TPU: 2048^3 took too little time there
              for one timed call to show the chip's rate, 45 TFLOP/s median on an H200), timed once before
              every timed step and `--rounds` times before each series of calls (so that on a shared machine
              it sees the same load as what it is compared with; `timed_calls` says why not before each
              call); its median GFLOP/s is the peak every fraction here is taken against;
  parts       (--parts) each part of the step on the step's own intermediate values, forward and
              forward+backward (gradients w.r.t. its parameters and its input; LPIPS w.r.t. the reconstruction
              only, its weights are frozen; the quantizer has no parameters): encoder, embedder, quantizer,
              splat, decoder (GaussianToken; the VQ baseline has no embedder or splat), the discriminator
              (one pass over B images, train-mode BatchNorm) and LPIPS (VGG16 over 2B images). "x/step" is how
              often the step runs it (the discriminator three times: once inside the generator's loss, on the
              real and the fake batch in its own), and "share" that many fwd+bwd times over the step's time.
Every program is compiled with the project's options (`xla_options`: on the CPU, no YNNPACK convolutions).
GFLOP are XLA's, from the cost analysis of each program traced and lowered, not compiled, for one CPU device
(`flops_on_cpu`), whatever the platform timed: the same model at the same batch. Off the CPU no count of XLA's
own serves: the cost analysis of a lowered program counted 0 FLOPs for the ImageNet step on an H200 (JAX
0.11.2), and that of a compiled executable 0.77 GFLOP per image for the bfloat16 CIFAR step at batch 64, whose
program does 46.0 (nearly all of the work, presumably the library calls to cuDNN and cuBLAS, left out); on the
CPU a compiled bfloat16 program counted 368. In float32 on the CPU lowered and compiled agree (the demo step:
1.055 against 1.057). The CPU programs differ from a GPU's only where the traced platform picks the form
(`xla_options.platform`): small-map convolutions as im2col + dot (the same multiply-adds) and the splat as XLA's
dense path, where a GPU runs the Pallas kernel (a custom call, which XLA would count as nothing). The train
steps' FLOPs are the whole mesh's, so their "%peak" is taken against the matmul's rate times the mesh's device
count, and "MFU %" against the device's datasheet bfloat16 peak (`BF16_PEAK`) times that count, on the GPUs it
lists (nan elsewhere). "%peak" is achieved GFLOP/s over the matmul's (medians); "best %" is the fastest step or
call over the fastest matmul, the figure least moved by other processes on a shared machine (their load only
ever slows both down).

LPIPS weights: the official ones when `losses.load_lpips_params` can load them (pip fetch, cached);
otherwise randomly initialised VGG16 weights of the same shapes, which time the same, and the output says so.

The last line printed is one JSON object: images_per_s, images_per_s_lpips, encode_images_per_s, gflops_per_image
(the step without LPIPS), gflops_per_image_lpips, encode_gflops_per_image, matmul_gflops, peak_fraction (the step
without LPIPS), peak_fraction_lpips, encode_peak_fraction, their `*_best` versions, mfu, mfu_lpips and encode_mfu
(null off the GPUs in `BF16_PEAK`), lpips_overhead (the median over the alternating pairs of steps of the time with
LPIPS over the time without, minus 1), and the settings and the host CPU (`cpu`: the ratios differ between CPUs of
one machine class). With --nolpips only the step without LPIPS is compiled and timed, and the LPIPS keys are null.
--trace_dir writes a profiler trace of two more steps (`benchmarks/trace_summary.py DIR` says where their device
time went).
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gaussiantoken_jax import config_lib, losses, splatting, xla_options
from gaussiantoken_jax import weights as weights_lib
from gaussiantoken_jax.data import to_model_input
from gaussiantoken_jax.train import sharding
from gaussiantoken_jax.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py[:runlocal].",
                                          lock_config=False)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global train batch size.")
_ENCODE_BATCH_SIZE = flags.DEFINE_integer("encode_batch_size", 64, "Batch size of the encode-only timing.")
_STEPS = flags.DEFINE_integer("steps", 12, "Timed train steps per variant (after compilation and 2 warm-ups).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed calls per encode, matmul and part row; the median is kept.")
_PARTS = flags.DEFINE_bool("parts", True, "Also time each part of the step (forward and forward+backward).")
_LPIPS = flags.DEFINE_bool("lpips", True, "Also time the step with LPIPS in the loss; --nolpips compiles one step "
                           "program instead of two (the ImageNet step takes minutes to compile on a GPU).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "If set, a JAX profiler trace of 2 steps without LPIPS is written "
                                  "there after the timing; benchmarks/trace_summary.py tabulates it.")
flags.mark_flags_as_required(["config"])

_WARMUP_STEPS = 2
# Datasheet dense bfloat16 tensor-core peaks with float32 accumulation, FLOP/s, by device_kind substring, the first
# match wins (the PCIe H100 before the SXM one): the MFU's denominator, which no noisy probe moves.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "RTX 3090": 35.6e12}
# Durations stated in epochs become steps for this many training images; schedules do not change the step's
# cost (the GAN's weight multiplies, it does not branch).
_NOMINAL_TRAIN_SIZE = 50_000


def flops_of(lowered) -> float:
  """FLOPs of a lowered program (`jax.stages.Lowered`), from XLA's cost analysis of its HLO (0 if none)."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per executable
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def one_cpu_mesh():
  return sharding.make_mesh(dict(data=1, fsdp=1), jax.devices("cpu")[:1])


def step_flops_on_cpu(config, batch_size: int, lpips_params) -> float:
  """FLOPs of the train step for `config` at a global batch, lowered (not compiled) for one CPU device."""
  steps = step_lib.make_steps(config, one_cpu_mesh())
  lpips_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), lpips_params)
  return flops_of(steps.train_step.trace(steps.abstract_state, steps.abstract_batch(batch_size),
                                         lpips_abstract).lower())


def flops_on_cpu(fn, *args) -> float:
  """FLOPs of `fn(*args)`, traced on a one-CPU mesh and lowered (not compiled) there; args may be on any device."""
  mesh = one_cpu_mesh()
  on_cpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu), args)
  return flops_of(jax.jit(sharding.traced_on(mesh, fn)).trace(*abstract).lower())


class MatmulProbe:
  """A size^3 matmul (float32 on the CPU, bfloat16 elsewhere); `sample()` times one and keeps its GFLOP/s."""

  def __init__(self):
    on_cpu = jax.default_backend() == "cpu"
    dtype, self.size = (jnp.float32, 2048) if on_cpu else (jnp.bfloat16, 8192)  # sizes: module docstring
    keys = jax.random.split(jax.random.key(0))
    self.operands = [jax.random.normal(k, (self.size, self.size), dtype) for k in keys]
    self.dtype = jnp.dtype(dtype).name
    self.matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(self.matmul(*self.operands))
    self.gflops: list[float] = []

  def sample(self) -> None:
    start = time.perf_counter()
    jax.block_until_ready(self.matmul(*self.operands))
    self.gflops.append(2 * self.size**3 / (time.perf_counter() - start) / 1e9)


def timed_calls(fn, *args, rounds: int, probe: MatmulProbe) -> list[float]:
  """Wall times of `rounds` back-to-back blocking calls, after `rounds` matmul samples and one warm-up call.

  Not a matmul before each call, as the steps have: a ~300 ms program right after a 2048^3 matmul ran 5-20%
  slower than after itself (the CIFAR encoder's forward at batch 8, 2 CPU cores; docs/benchmarks.md, "Once more
  on the AMD EPYC"), while the steps, 2.4 s each, did not slow down.
  """
  for _ in range(rounds):
    probe.sample()
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return samples


def lpips_params_or_random(config):
  """(LPIPS parameters, "official" | "random"): random VGG16 weights of the right shapes if none can load."""
  try:
    return losses.load_lpips_params(config.loss.lpips_weights_path), "official"
  except (weights_lib.WeightsUnavailableError, OSError, ValueError) as err:
    print(f"LPIPS weights unavailable ({str(err).splitlines()[0]}); timing randomly initialised VGG16 weights "
          "of the same shapes.")
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    return losses.LPIPS().init(jax.random.key(0), dummy, dummy)["params"], "random"


def synthetic_images(batch_size: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)


class StepRunner:
  """One variant of the train step, compiled, with its own state; `step(timed)` runs one step."""

  def __init__(self, config, mesh, lpips_params, batch_size: int):
    self.steps = step_lib.make_steps(config, mesh)
    self.state = self.steps.init()
    self.lpips_params = self.steps.replicate(lpips_params)
    start = time.perf_counter()
    lowered = self.steps.train_step.lower(self.state, self.steps.abstract_batch(batch_size), self.lpips_params)
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = step_flops_on_cpu(config, batch_size, lpips_params)
    images = synthetic_images(batch_size, config.data.image_size, 0)
    self.batch = {"image": jax.device_put(images, self.steps.batch_sharding)}
    self.seconds: list[float] = []

  def step(self, timed: bool) -> None:
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch, self.lpips_params)
    jax.block_until_ready((self.state, metrics))
    if timed:
      self.seconds.append(time.perf_counter() - start)


def time_encode(steps, state, image_size: int, batch_size: int, rounds: int, probe: MatmulProbe):
  """(seconds of each timed call, FLOPs per call) of images -> tokens with the EMA parameters."""
  model = steps.model

  def encode(params, model_state, images):
    return model.apply({"params": params, **model_state}, to_model_input(images), train=False,
                       method=model.encode)

  args = (state.ema_params, state.model_state, jnp.asarray(synthetic_images(batch_size, image_size, 1)))
  compiled = jax.jit(encode, compiler_options=xla_options.compiler_options()).lower(*args).compile()
  return timed_calls(compiled, *args, rounds=rounds, probe=probe), flops_on_cpu(encode, *args)


def _sum_against(tree, cotangents):
  return sum(jnp.sum(leaf * ct) for leaf, ct in zip(jax.tree.leaves(tree), cotangents))


def time_part(fn, args, grad_argnums, rounds: int, probe: MatmulProbe):
  """(fwd seconds, fwd FLOPs, fwd+bwd seconds, fwd+bwd FLOPs, output) of `fn(*args)`.

  fwd+bwd returns the gradients w.r.t. `args[i]` for i in `grad_argnums` of <fn(*args), fixed random
  cotangents>.
  """
  options = xla_options.compiler_options()  # as the step's own programs are compiled
  fwd = jax.jit(fn, compiler_options=options).lower(*args).compile()
  output = fwd(*args)
  rng = np.random.default_rng(2)
  cotangents = [jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype) for leaf in jax.tree.leaves(output)]
  fn_grad = jax.grad(lambda *a: _sum_against(fn(*a), cotangents), argnums=grad_argnums)
  fwd_bwd = jax.jit(fn_grad, compiler_options=options).lower(*args).compile()
  fwd_seconds = statistics.median(timed_calls(fwd, *args, rounds=rounds, probe=probe))
  fwd_bwd_seconds = statistics.median(timed_calls(fwd_bwd, *args, rounds=rounds, probe=probe))
  return fwd_seconds, flops_on_cpu(fn, *args), fwd_bwd_seconds, flops_on_cpu(fn_grad, *args), output


def part_rows(steps, state, lpips_params, batch_size: int, rounds: int, probe: MatmulProbe):
  """[(name, times per step, fwd s, fwd FLOPs, fwd+bwd s, fwd+bwd FLOPs)] on one batch's intermediate values."""
  config, model = steps.config, steps.model
  size = config.data.image_size
  params, model_state = state.params, state.model_state
  x = to_model_input(jnp.asarray(synthetic_images(batch_size, size, 0)))
  keys = jax.random.split(jax.random.key(3), 3)
  rows = []

  def add(name, per_step, fn, args, grad_argnums):
    fwd, fwd_flops, both, both_flops, output = time_part(fn, args, grad_argnums, rounds, probe)
    rows.append((name, per_step, fwd, fwd_flops, both, both_flops))
    print(f"  timed {name}", flush=True)
    return output

  features = add("encoder", 1, lambda p, a: model.encoder.apply({"params": p}, a), (params["encoder"], x), (0, 1))
  gaussian = config.model.type == "gaussiantoken"
  if gaussian:
    def embed(p, a):
      return model.embedder.apply({"params": p, "range_scheduler": model_state["range_scheduler"]["embedder"]},
                                  a, train=True, rngs={"dropout": keys[0]}, mutable=["range_scheduler"])[0]
    gaussians = add("embedder", 1, embed, (params["embedder"], features), (0, 1))
    to_quantize = gaussians.features
  else:
    to_quantize = features

  def quantize(a):
    return model.quantizer.apply({"codebook": model_state["codebook"]["quantizer"]}, a, train=True,
                                 rngs={"quantizer": keys[1]}, mutable=["codebook"])[0][0]
  quantized = add("quantizer", 1, quantize, (to_quantize,), (0,))
  if gaussian:
    h, w = model.feature_shape

    def splat(means, rotations, scales, feats):
      return splatting.splat(means, rotations, scales, feats, height=h, width=w, cutoff=model.splat_cutoff,
                             impl=model.splat_impl)
    z_map = add("splat", 1, splat, (gaussians.means, gaussians.rotations, gaussians.scales, quantized),
                (0, 1, 2, 3))
  else:
    z_map = quantized
  x_hat = add("decoder", 1, lambda p, a: model.decoder.apply({"params": p}, a), (params["decoder"], z_map), (0, 1))

  def discriminate(p, a):
    return steps.discriminator.apply({"params": p, "batch_stats": state.disc_batch_stats}, a, train=True,
                                     mutable=["batch_stats"])[0]
  add("discriminator", 3, discriminate, (state.disc_params, x_hat), (0, 1))

  def perceptual(y):
    return losses.LPIPS(dtype=jnp.dtype(config.model.conv_dtype).type).apply(
        {"params": lpips_params}, x, y, deterministic=False, rngs={"dropout": keys[2]})
  add("LPIPS", 1, perceptual, (x_hat,), (0,))
  return rows


def host_cpu() -> str:
  """The host's CPU as /proc/cpuinfo names it, with its family and model numbers and AVX-512 if it has it: the
  fractions of the matmul peak differ between CPUs of the same machine class (docs/benchmarks.md)."""
  try:
    first_processor = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
  except OSError:
    return platform.processor() or "unknown"
  info = dict((key.strip(), value.strip()) for key, _, value in
              (line.partition(":") for line in first_processor.splitlines()))
  avx512 = ", AVX-512" if "avx512f" in info.get("flags", "").split() else ""
  return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}{avx512})"


def main(argv):
  del argv
  config = _CONFIG.value.copy_and_resolve_references()
  batch_size, rounds = _BATCH_SIZE.value, _ROUNDS.value
  config.batch_size = batch_size
  if hasattr(config_lib, "resolve_steps"):  # configs whose durations are in epochs
    config = config_lib.resolve_steps(config, _NOMINAL_TRAIN_SIZE)
  device = jax.devices()[0]
  bf16_peak = next((v for key, v in BF16_PEAK.items() if key in device.device_kind), None)
  cpu = host_cpu()
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores ({cpu}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"config {config.model.type}, image {config.data.image_size}, batch {batch_size}, "
        f"conv_dtype {config.model.conv_dtype}, encode batch {_ENCODE_BATCH_SIZE.value}")
  mesh = sharding.make_mesh(config.mesh)
  lpips_params, lpips_source = lpips_params_or_random(config)
  probe = MatmulProbe()

  runners = {}
  variants = (("step", 0.0), ("step+lpips", config.loss.lpips_weight or 1.0))[:2 if _LPIPS.value else 1]
  for name, lpips_weight in variants:
    variant = config.copy_and_resolve_references()
    variant.loss.lpips_weight = lpips_weight
    runners[name] = StepRunner(variant, mesh, lpips_params, batch_size)
    print(f"  {name}: compiled in {runners[name].compile_seconds:.0f} s", flush=True)
  # The two variants alternate step by step, each step after one matmul sample, so that on a shared machine
  # they all see the same load.
  for i in range(_WARMUP_STEPS + _STEPS.value):
    for runner in runners.values():
      if i >= _WARMUP_STEPS:
        probe.sample()
      runner.step(timed=i >= _WARMUP_STEPS)
  if _TRACE_DIR.value:  # after the timed steps, so that the trace costs them nothing
    with jax.profiler.trace(_TRACE_DIR.value):
      for _ in range(2):
        runners["step"].step(timed=False)
    print(f"  traced 2 steps into {_TRACE_DIR.value}", flush=True)
  # (seconds, FLOPs, batch, devices the program runs on): the steps on the mesh, encode on one device.
  results = {name: (runner.seconds, runner.flops, batch_size, mesh.devices.size) for name, runner in runners.items()}
  last = list(runners)[-1]  # the step with LPIPS when it ran; its state has trained like the other's
  steps, state = runners[last].steps, runners[last].state
  samples, flops = time_encode(steps, state, config.data.image_size, _ENCODE_BATCH_SIZE.value, rounds, probe)
  results["encode"] = (samples, flops, _ENCODE_BATCH_SIZE.value, 1)
  matmul, matmul_best = statistics.median(probe.gflops), max(probe.gflops)

  print(f"\nmatmul {probe.size}^3 {probe.dtype}: {matmul:.0f} GFLOP/s (median of {len(probe.gflops)}; "
        f"min {min(probe.gflops):.0f}, max {matmul_best:.0f})")
  print(f"LPIPS weights: {lpips_source}")
  print(f"\n{'what':<12} {'batch':>5} {'ms':>9} {'best ms':>9} {'img/s':>8} {'GFLOP/img':>10} {'GFLOP/s':>8} "
        f"{'%peak':>6} {'best %':>6} {'MFU %':>6}")
  summary = {}
  for name, (samples, flops, batch, devices) in results.items():
    seconds, best = statistics.median(samples), min(samples)
    achieved = flops / seconds / 1e9
    summary[name] = dict(images_per_s=batch / seconds, gflops_per_image=flops / batch / 1e9,
                         peak_fraction=achieved / (matmul * devices),
                         peak_fraction_best=flops / best / 1e9 / (matmul_best * devices), ms=seconds * 1e3,
                         mfu=achieved * 1e9 / (bf16_peak * devices) if bf16_peak else None)
    print(f"{name:<12} {batch:>5} {seconds * 1e3:9.1f} {best * 1e3:9.1f} {batch / seconds:8.2f} "
          f"{flops / batch / 1e9:10.2f} {achieved:8.0f} {100 * summary[name]['peak_fraction']:6.1f} "
          f"{100 * summary[name]['peak_fraction_best']:6.1f} "
          f"{100 * summary[name]['mfu'] if bf16_peak else float('nan'):6.1f}")

  if _PARTS.value:
    print("\nParts of the step (one call each, batch as above; f+b = forward and all gradients):", flush=True)
    rows = part_rows(steps, state, lpips_params, batch_size, rounds, probe)
    step_seconds = statistics.median(results[last][0])
    parts_matmul = statistics.median(probe.gflops)
    print(f"{'part':<14} {'fwd ms':>8} {'GFLOP':>7} {'%peak':>6} {'f+b ms':>8} {'GFLOP':>7} {'%peak':>6} "
          f"{'x/step':>6} {'share':>6}")
    for name, per_step, fwd, fwd_flops, both, both_flops in rows:
      print(f"{name:<14} {fwd * 1e3:8.1f} {fwd_flops / 1e9:7.2f} {100 * fwd_flops / fwd / 1e9 / parts_matmul:6.1f} "
            f"{both * 1e3:8.1f} {both_flops / 1e9:7.2f} {100 * both_flops / both / 1e9 / parts_matmul:6.1f} "
            f"{per_step:>6} {100 * per_step * both / step_seconds:5.1f}%")
    print(f"(%peak against the matmul median over the whole run, {parts_matmul:.0f} GFLOP/s; share: of the "
          f"median {'step with LPIPS' if last == 'step+lpips' else 'step'})")

  step, encode = summary["step"], summary["encode"]
  lpips = {key: None for key in step}  # the LPIPS keys stay in the JSON, as null, under --nolpips
  lpips_overhead = None
  if "step+lpips" in summary:
    digits = dict(images_per_s=3, gflops_per_image=3, peak_fraction=4, peak_fraction_best=4, ms=1, mfu=4)  # the step's
    lpips = {key: None if value is None else round(value, digits[key])
             for key, value in summary["step+lpips"].items()}
    # Median over the alternating pairs of steps of (with LPIPS / without) - 1.
    lpips_overhead = round(statistics.median(
        b / a for a, b in zip(results["step"][0], results["step+lpips"][0])) - 1.0, 4)
    print(f"\nLPIPS adds {100 * lpips_overhead:.0f}% to the step (median over the {_STEPS.value} alternating pairs)")
  print(json.dumps(dict(
      images_per_s=round(step["images_per_s"], 3), images_per_s_lpips=lpips["images_per_s"],
      encode_images_per_s=round(encode["images_per_s"], 3), gflops_per_image=round(step["gflops_per_image"], 3),
      gflops_per_image_lpips=lpips["gflops_per_image"],
      encode_gflops_per_image=round(encode["gflops_per_image"], 3),
      matmul_gflops=round(matmul, 1), matmul_gflops_best=round(matmul_best, 1),
      peak_fraction=round(step["peak_fraction"], 4), peak_fraction_lpips=lpips["peak_fraction"],
      encode_peak_fraction=round(encode["peak_fraction"], 4),
      peak_fraction_best=round(step["peak_fraction_best"], 4),
      peak_fraction_lpips_best=lpips["peak_fraction_best"],
      encode_peak_fraction_best=round(encode["peak_fraction_best"], 4),
      mfu=step["mfu"] and round(step["mfu"], 4), mfu_lpips=lpips["mfu"],
      encode_mfu=encode["mfu"] and round(encode["mfu"], 4),
      lpips_overhead=lpips_overhead, step_ms=round(step["ms"], 1),
      step_lpips_ms=lpips["ms"], encode_ms=round(encode["ms"], 1), batch_size=batch_size,
      encode_batch_size=_ENCODE_BATCH_SIZE.value, steps=_STEPS.value, backend=device.platform, cpu=cpu,
      lpips_weights=lpips_source)))


if __name__ == "__main__":
  app.run(main)
