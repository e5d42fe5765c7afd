"""Encoder, decoder and PatchGAN discriminator against float64 NumPy forwards written from the formulas.

Every NumPy function below is an independent re-implementation (convolution as a sum of shifted einsums,
GroupNorm / BatchNorm from their definitions, depth-to-space by strided assignment), so a wrong padding,
stride, channel order, norm axis or layer order in the Flax modules shows up as a mismatch. Parameters are
perturbed away from their init (GroupNorm scale 1 / bias 0 would hide a missing affine) before comparing.
Sizes are tiny; the full-size checks (parameter counts, 256x256 logit map) use jax.eval_shape only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax import xla_options
from gaussiantoken_jax.models.discriminator import PatchDiscriminator
from gaussiantoken_jax.models.encoder_decoder import (AdaptiveGroupNorm, Decoder, Encoder, GroupNorm, ResBlock,
                                                      depth_to_space)

GN_EPS = 1e-6
BN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------
# float64 NumPy reference
# ----------------------------------------------------------------------------------------------------------
def np_conv(x, kernel, bias=None, *, stride=1, pad=None):
  """Cross-correlation, NHWC x HWIO, symmetric zero padding (default k // 2), PyTorch output size."""
  k = kernel.shape[0]
  pad = k // 2 if pad is None else pad
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] + 2 * pad - k) // stride + 1
  out_w = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for dy in range(k):
    for dx in range(k):
      patch = xp[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
      out += np.einsum("bhwi,io->bhwo", patch, kernel[dy, dx])
  return out if bias is None else out + bias


def np_group_norm(x, groups, scale=None, bias=None):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + GN_EPS)).reshape(x.shape)
  return y if scale is None else y * scale + bias


def np_swish(x):
  return x / (1.0 + np.exp(-x))


def np_leaky_relu(x):
  return np.where(x >= 0, x, 0.2 * x)


def np_norm_swish(p, x, groups):
  return np_swish(np_group_norm(x, groups, p["scale"], p["bias"]))


def np_resblock(p, x, groups):
  h = np_conv(np_norm_swish(p["norm1"], x, groups), p["conv1"]["kernel"])
  h = np_conv(np_norm_swish(p["norm2"], h, groups), p["conv2"]["kernel"])
  shortcut = np_conv(x, p["nin_shortcut"]["kernel"]) if "nin_shortcut" in p else x
  return shortcut + h


def np_adagn(p, x, style, groups):
  mean = style.mean(axis=(1, 2))
  n = style.shape[1] * style.shape[2]
  # Unbiased, as torch's default `var` in the reference.
  std = np.sqrt(((style - mean[:, None, None, :]) ** 2).sum(axis=(1, 2)) / (n - 1) + GN_EPS)  # [B, z]
  gamma = std @ p["gamma"]["kernel"] + p["gamma"]["bias"]
  beta = mean @ p["beta"]["kernel"] + p["beta"]["bias"]
  return gamma[:, None, None, :] * np_group_norm(x, groups) + beta[:, None, None, :]


def np_depth_to_space(x, s):
  b, h, w, c = x.shape
  c_out = c // (s * s)
  out = np.zeros((b, h * s, w * s, c_out), x.dtype)
  for by in range(s):
    for bx in range(s):
      out[:, by::s, bx::s, :] = x[..., (by * s + bx) * c_out:(by * s + bx + 1) * c_out]
  return out


def np_encoder(p, x, ch_mult, num_res_blocks, groups):
  h = np_conv(x, p["conv_in"]["kernel"])
  for level in range(len(ch_mult)):
    for i in range(num_res_blocks):
      h = np_resblock(p[f"down_{level}_block_{i}"], h, groups)
    if level < len(ch_mult) - 1:
      ds = p[f"down_{level}_downsample"]
      h = np_conv(h, ds["kernel"], ds["bias"], stride=2, pad=1)
  for i in range(num_res_blocks):
    h = np_resblock(p[f"mid_block_{i}"], h, groups)
  return np_conv(np_norm_swish(p["norm_out"], h, groups), p["conv_out"]["kernel"], p["conv_out"]["bias"])


def np_decoder(p, z, ch_mult, num_res_blocks, groups):
  h = np_conv(z, p["conv_in"]["kernel"], p["conv_in"]["bias"])
  for i in range(num_res_blocks):
    h = np_resblock(p[f"mid_block_{i}"], h, groups)
  for level in reversed(range(len(ch_mult))):
    h = np_adagn(p[f"adaptive_{level}"], h, z, groups)
    for i in range(num_res_blocks):
      h = np_resblock(p[f"up_{level}_block_{i}"], h, groups)
    if level > 0:
      up = p[f"up_{level}_upsample"]
      h = np_depth_to_space(np_conv(h, up["kernel"], up["bias"]), 2)
  return np_conv(np_norm_swish(p["norm_out"], h, groups), p["conv_out"]["kernel"], p["conv_out"]["bias"])


def np_discriminator(p, stats, x, n_layers, train):
  """Returns logits and, in train mode, the batch (mean, biased var) of every BatchNorm input."""
  h = np_leaky_relu(np_conv(x, p["conv_0"]["kernel"], p["conv_0"]["bias"], stride=2, pad=1))
  batch_stats = {}
  for layer in range(1, n_layers + 1):
    h = np_conv(h, p[f"conv_{layer}"]["kernel"], stride=2 if layer < n_layers else 1, pad=1)
    name = f"norm_{layer}"
    if train:
      mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
      batch_stats[name] = (mean, var)
    else:
      mean, var = stats[name]["mean"], stats[name]["var"]
    h = np_leaky_relu((h - mean) / np.sqrt(var + BN_EPS) * p[name]["scale"] + p[name]["bias"])
  last = p[f"conv_{n_layers + 1}"]
  return np_conv(h, last["kernel"], last["bias"], stride=1, pad=1), batch_stats


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def perturb(params, seed):
  """Adds N(0, 0.1) to every parameter so that unit GN scales and zero biases cannot hide a bug."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def to_f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def assert_close(actual, expected, rel=2e-4):
  """Max abs error below `rel` x the largest reference magnitude (float32 vs float64)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = np.abs(expected).max()
  err = np.abs(actual - expected).max()
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


def count_params(module, *args, **kwargs):
  abstract = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in args]
  variables = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *abstract)
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def all_eqns(jaxpr):
  """Every equation of a jaxpr, descending into sub-jaxprs (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from all_eqns(inner)


def rand(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------
def test_depth_to_space_is_dcr_order():
  x = rand(0, (2, 3, 4, 4 * 5))
  np.testing.assert_array_equal(np.asarray(depth_to_space(x, 2)), np_depth_to_space(np.asarray(x), 2))
  x3 = rand(1, (1, 2, 3, 9 * 2))
  np.testing.assert_array_equal(np.asarray(depth_to_space(x3, 3)), np_depth_to_space(np.asarray(x3), 3))


# The CPU sums per channel then per group, other platforms in one reduction: both are checked here, on the CPU,
# by making the module see the other platform while it traces.
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_group_norm_matches_numpy_on_both_reductions_and_at_small_variances(monkeypatch, platform):
  monkeypatch.setattr(xla_options, "platform", lambda: platform)
  norm = GroupNorm(num_groups=4)
  # Activations with variance 1e-6, the size of the epsilon (1e-6, the reference's): a wrong epsilon moves the
  # result by tens of percent, and an offset of 5 standard deviations checks the two-pass variance. float32 keeps
  # ~1e-6 of the centred values' relative precision here, far inside assert_close's 2e-4.
  x = 5e-3 + 1e-3 * rand(30, (2, 5, 6, 8))
  params = perturb(norm.init(jax.random.key(31), x)["params"], seed=32)
  out = norm.apply({"params": params}, x)
  p = to_f64(params)
  assert_close(out, np_group_norm(np.asarray(x, np.float64), 4, p["scale"], p["bias"]))


def test_encoder_init_is_pytorchs_default_uniform_over_the_fan_in():
  """Kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k * k * in_channels (PyTorch's Conv2d
  default, what the reference trains from), on the downsampler: 3 x 3 x 32 in."""
  encoder = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, out_channels=5, num_groups=4)
  params = jax.jit(encoder.init)(jax.random.key(40), jnp.zeros((1, 8, 8, 3)))["params"]
  layer = params["down_0_downsample"]
  bound = 1.0 / np.sqrt(3 * 3 * 32)
  kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
  assert kernel.shape == (3, 3, 32, 32) and bias.shape == (32,)
  # 9216 uniform draws: the standard deviation bound / sqrt(3) to ~0.5% (one standard error); 3% is 6 of them.
  assert np.abs(kernel).max() <= bound and kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.03)
  # 32 draws: all inside the bound and spread over it (a zero or a wider init fails one of these).
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.8 * bound


@pytest.mark.parametrize("in_channels,out_channels", [(8, 16), (8, 8)])
def test_resblock_matches_numpy(in_channels, out_channels):
  block = ResBlock(out_channels, num_groups=4)
  x = rand(2, (2, 5, 6, in_channels))
  params = perturb(block.init(jax.random.key(3), x)["params"], seed=4)
  assert ("nin_shortcut" in params) == (in_channels != out_channels)
  out = jax.jit(block.apply)({"params": params}, x)
  assert_close(out, np_resblock(to_f64(params), np.asarray(x, np.float64), groups=4))


def test_adaptive_group_norm_matches_numpy():
  # The style map has its own channel count and spatial size, as in the decoder (z-map vs upsampled features).
  norm = AdaptiveGroupNorm(num_groups=4)
  x, style = rand(5, (2, 4, 6, 8)), 2.0 + 3.0 * rand(6, (2, 3, 5, 3))
  params = perturb(norm.init(jax.random.key(7), x, style)["params"], seed=8)
  out = jax.jit(norm.apply)({"params": params}, x, style)
  assert_close(out, np_adagn(to_f64(params), np.asarray(x, np.float64), np.asarray(style, np.float64), 4))


# ----------------------------------------------------------------------------------------------------------
# encoder / decoder
# ----------------------------------------------------------------------------------------------------------
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=2, num_groups=4)


@pytest.fixture(scope="module")
def tiny_encoder_decoder():
  """A tiny 2-level encoder/decoder pair with perturbed params, on a non-square batch."""
  encoder = Encoder(out_channels=5, **TINY)
  decoder = Decoder(out_channels=3, z_channels=5, **TINY)
  images = rand(10, (2, 8, 12, 3))
  enc_params = perturb(jax.jit(encoder.init)(jax.random.key(11), images)["params"], seed=12)
  features = jax.jit(encoder.apply)({"params": enc_params}, images)
  dec_params = perturb(jax.jit(decoder.init)(jax.random.key(13), features)["params"], seed=14)
  recon = jax.jit(decoder.apply)({"params": dec_params}, features)
  return dict(encoder=encoder, decoder=decoder, images=images, enc_params=enc_params, features=features,
              dec_params=dec_params, recon=recon)


def test_encoder_matches_numpy(tiny_encoder_decoder):
  t = tiny_encoder_decoder
  assert t["features"].shape == (2, 4, 6, 5) and t["features"].dtype == jnp.float32
  expected = np_encoder(to_f64(t["enc_params"]), np.asarray(t["images"], np.float64), TINY["ch_mult"],
                        TINY["num_res_blocks"], TINY["num_groups"])
  assert_close(t["features"], expected)


def test_decoder_matches_numpy(tiny_encoder_decoder):
  t = tiny_encoder_decoder
  assert t["recon"].shape == (2, 8, 12, 3) and t["recon"].dtype == jnp.float32
  # Each level's AdaGN sees the channel count of the level above it (CIFAR: 256 at both levels).
  assert t["dec_params"]["adaptive_1"]["gamma"]["kernel"].shape == (5, 16)
  assert t["dec_params"]["adaptive_0"]["gamma"]["kernel"].shape == (5, 16)
  expected = np_decoder(to_f64(t["dec_params"]), np.asarray(t["features"], np.float64), TINY["ch_mult"],
                        TINY["num_res_blocks"], TINY["num_groups"])
  assert_close(t["recon"], expected)


def test_bfloat16_convs_float32_norms_and_params(tiny_encoder_decoder):
  t = tiny_encoder_decoder
  encoder = t["encoder"].clone(dtype=jnp.bfloat16)
  variables = {"params": t["enc_params"]}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(encoder.init(jax.random.key(0), t["images"])))
  jaxpr = jax.make_jaxpr(encoder.apply)(variables, t["images"]).jaxpr
  eqns = list(all_eqns(jaxpr))
  convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
  sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert sums and all(v.aval.dtype == jnp.float32 for e in sums for v in e.invars)
  out = jax.jit(encoder.apply)(variables, t["images"])
  assert out.dtype == jnp.float32
  assert_close(out, t["features"], rel=5e-2)


# Tolerances: float32 rounding in float32; in bfloat16 a few units of its 2^-8 roundoff, as a recomputed map that
# rounds the other way to bfloat16 before a convolution moves the output by one bfloat16 step.
@pytest.mark.parametrize("dtype, max_ratio, rel", [(jnp.float32, 0.6, 1e-5), (jnp.bfloat16, 0.4, 3e-2)])
def test_remat_norms_keeps_the_results_and_saves_less(tiny_encoder_decoder, dtype, max_ratio, rel):
  """remat_norms recomputes each GroupNorm + swish in the backward pass: the same output and gradients, and the
  backward keeps far fewer bytes (the residuals are the leaves of the function `jax.vjp` returns).

  Bound: without it a GroupNorm + swish keeps about four float32 maps (its input cast to float32, the centred and
  the normalised map, the sigmoid) besides the next convolution's input; with it, its own input and that
  convolution's input: about 2 of 5 maps in float32, 1 of 4.5 in bfloat16 (half-size maps), before the
  convolutions' other residuals, which both keep.
  """
  t = tiny_encoder_decoder
  results = {}
  for remat in (False, True):
    apply = t["encoder"].clone(dtype=dtype, remat_norms=remat).apply
    out, vjp = jax.vjp(lambda p, x, apply=apply: apply({"params": p}, x), t["enc_params"], t["images"])
    results[remat] = out, vjp(jnp.cos(out)), sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
  (out, grads, kept), (out_remat, grads_remat, kept_remat) = results[False], results[True]
  assert_close(out_remat, out, rel=rel)
  for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    assert_close(g_remat, g, rel=rel)
  assert kept_remat < max_ratio * kept, (kept_remat, kept)


def test_non_square_shapes_three_levels():
  encoder = Encoder(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, out_channels=6, num_groups=4)
  decoder = Decoder(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, out_channels=3, num_groups=4)
  images = jax.ShapeDtypeStruct((3, 8, 20, 3), jnp.float32)
  features, _ = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x), images)
  assert features.shape == (3, 2, 5, 6)
  recon, _ = jax.eval_shape(lambda z: decoder.init_with_output(jax.random.key(0), z), features)
  assert recon.shape == (3, 8, 20, 3)


# Reference section 8 (the reference's own arithmetic from its layer sizes): parameter counts in millions.
@pytest.mark.parametrize("ch_mult,z,encoder_millions,decoder_millions", [
    ((1, 2), 3, 10.53, 13.18),  # CIFAR
    ((1, 2, 2, 4), 8, 48.45, 63.52),  # Mini-ImageNet / ImageNet
])
def test_parameter_counts_match_reference(ch_mult, z, encoder_millions, decoder_millions):
  stride = 2 ** (len(ch_mult) - 1)
  n_enc = count_params(Encoder(ch=128, ch_mult=ch_mult, num_res_blocks=4, out_channels=64),
                       (1, stride, stride, 3))
  n_dec = count_params(Decoder(ch=128, ch_mult=ch_mult, num_res_blocks=4, out_channels=3, z_channels=z),
                       (1, 2, 2, z))
  assert n_enc / 1e6 == pytest.approx(encoder_millions, rel=0.01)
  assert n_dec / 1e6 == pytest.approx(decoder_millions, rel=0.01)


# ----------------------------------------------------------------------------------------------------------
# discriminator
# ----------------------------------------------------------------------------------------------------------
def test_discriminator_full_size_params_and_logit_maps():
  disc = PatchDiscriminator()
  assert count_params(disc, (1, 32, 32, 3), train=False) / 1e6 == pytest.approx(2.77, rel=0.01)
  for size, logits in ((32, 2), (256, 30)):
    out, _ = jax.eval_shape(lambda x: disc.init_with_output(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert out.shape == (2, logits, logits, 1)


@pytest.fixture(scope="module")
def tiny_discriminator():
  disc = PatchDiscriminator(ndf=8)
  images = rand(20, (4, 32, 32, 3))
  variables = disc.init(jax.random.key(21), images, train=False)
  return disc, images, variables


def test_discriminator_init_distribution(tiny_discriminator):
  _, _, variables = tiny_discriminator
  p = variables["params"]
  kernel = np.asarray(p["conv_3"]["kernel"])  # 4 x 4 x 32 x 64 = 32768 draws
  assert abs(kernel.mean()) < 1e-3 and kernel.std() == pytest.approx(0.02, rel=0.05)
  scales = np.concatenate([np.asarray(p[f"norm_{i}"]["scale"]) for i in (1, 2, 3)])  # 112 draws
  assert abs(scales.mean() - 1.0) < 0.01 and scales.std() == pytest.approx(0.02, rel=0.3)
  assert all(not np.asarray(p[f"norm_{i}"]["bias"]).any() for i in (1, 2, 3))
  # taming's weights_init leaves conv biases alone: the first and last convs keep PyTorch's default bias init,
  # U(+-1/sqrt(fan_in)) over their 4 x 4 x in_channels inputs.
  for name, fan_in in (("conv_0", 4 * 4 * 3), ("conv_4", 4 * 4 * 64)):
    bias, bound = np.asarray(p[name]["bias"]), 1.0 / np.sqrt(fan_in)
    assert 0 < np.abs(bias).max() <= bound, (name, bias, bound)
  assert np.abs(np.asarray(p["conv_0"]["bias"])).max() > 0.5 * 1.0 / np.sqrt(4 * 4 * 3)  # 8 draws spread over it
  for i in (1, 2, 3):
    stats = variables["batch_stats"][f"norm_{i}"]
    assert (np.asarray(stats["mean"]) == 0).all() and (np.asarray(stats["var"]) == 1).all()


def test_discriminator_train_mode_matches_numpy_and_updates_stats(tiny_discriminator):
  disc, images, variables = tiny_discriminator
  params = perturb(variables["params"], seed=22)
  old_stats = to_f64(variables["batch_stats"])
  apply = jax.jit(functools.partial(disc.apply, train=True, mutable=["batch_stats"]))
  logits, updates = apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
  expected, batch = np_discriminator(to_f64(params), None, np.asarray(images, np.float64), 3, train=True)
  assert logits.shape == (4, 2, 2, 1)
  assert_close(logits, expected)
  for name, (mean, var) in batch.items():  # running = 0.9 running + 0.1 batch (PyTorch momentum 0.1)
    assert_close(updates["batch_stats"][name]["mean"], 0.9 * old_stats[name]["mean"] + 0.1 * mean)
    assert_close(updates["batch_stats"][name]["var"], 0.9 * old_stats[name]["var"] + 0.1 * var)


def test_discriminator_eval_mode_uses_running_stats(tiny_discriminator):
  disc, images, variables = tiny_discriminator
  params = perturb(variables["params"], seed=23)
  stats = jax.tree.map(lambda a: a + 0.5 * jnp.abs(jax.random.normal(jax.random.key(24), a.shape)),
                       variables["batch_stats"])
  apply = jax.jit(functools.partial(disc.apply, train=False, mutable=["batch_stats"]))
  logits, updates = apply({"params": params, "batch_stats": stats}, images)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], stats)
  expected, _ = np_discriminator(to_f64(params), to_f64(stats), np.asarray(images, np.float64), 3, train=False)
  assert_close(logits, expected)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------
def _init_abstract(module, *shapes_dtypes, **kwargs):
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_dtypes]
  jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)


SMALL = dict(ch=8, num_res_blocks=1, num_groups=4)
F32 = jnp.float32


@pytest.mark.parametrize("module,inputs,kwargs,message", [
    (Encoder(**SMALL), [((8, 8, 3), F32)], {}, r"Encoder: `images` must have shape \[B, H, W, 3\].*\(8, 8, 3\)"),
    (Encoder(**SMALL), [((1, 8, 8, 4), F32)], {}, r"`images` must have shape \[B, H, W, 3\].*\(1, 8, 8, 4\)"),
    (Encoder(ch_mult=(1, 2, 2), **SMALL), [((1, 8, 10, 3), F32)], {}, r"multiples of 4.*\(1, 8, 10, 3\)"),
    (Encoder(**SMALL), [((1, 8, 8, 3), jnp.int32)], {}, r"`images` must be a floating-point array.*int32"),
    (Encoder(ch=8, num_res_blocks=1, num_groups=32), [((1, 8, 8, 3), F32)], {}, r"`num_groups` \(32\)"),
    (Encoder(ch_mult=(), **SMALL), [((1, 8, 8, 3), F32)], {}, r"`ch_mult` must be a non-empty"),
    (Decoder(z_channels=8, **SMALL), [((1, 4, 4, 3), F32)], {}, r"Decoder: `z` must have shape \[B, H, W, 8\]"),
    (Decoder(**SMALL), [((1, 4, 4), F32)], {}, r"Decoder: `z` must have shape \[B, H, W, C\].*\(1, 4, 4\)"),
    (PatchDiscriminator(ndf=8), [((1, 32, 32, 1), F32)], dict(train=False),
     r"PatchDiscriminator: `images` must have shape \[B, H, W, 3\]"),
    (PatchDiscriminator(ndf=8), [((1, 8, 32, 3), F32)], dict(train=False), r"too small for n_layers=3"),
])
def test_bad_input_raises_value_error(module, inputs, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _init_abstract(module, *inputs, **kwargs)


def test_depth_to_space_rejects_bad_channels():
  with pytest.raises(ValueError, match=r"multiple of block_size\*\*2 = 4.*\(1, 2, 2, 6\)"):
    depth_to_space(jnp.zeros((1, 2, 2, 6)), 2)
