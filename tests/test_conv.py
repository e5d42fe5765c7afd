"""The CPU formulations equal the plain ones, values and gradients: models.conv (im2col + dot for convolutions whose
window exceeds their map) and the encoder/decoder's GroupNorm (per-channel sums, then per group).

Tolerances come from float32 rounding. The two forms add the same products in different orders; each output (or
gradient element) is a sum of n products, and the error of either order is at most a few ulp times sqrt(n) times
the sum of the products' magnitudes, which is the same bilinear map applied to |x|, |w| and |cotangent|:
    |im2col - conv| <= 4 * eps32 * sqrt(n) * op(|x|, |w|)   (per element)
with n = kh*kw*C_in for the output, kh*kw*C_out for the input gradient and B*oh*ow for the kernel gradient.
A wrong tap order or a transposed kernel moves outputs by about op(|x|, |w|) / sqrt(n), far above that.
GroupNorm's statistics are sums of n = H*W*C/G elements; a mean off by eps*sqrt(n)*|mean| moves the
normalised values by that over the std, hence 4 * eps32 * sqrt(n) * (1 + |mean| / std) of each leaf's largest
value (measured: at most 0.23 of that bound without the mean term, 0.05 with it).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.losses import LPIPS
from gaussiantoken_jax.models import conv
from gaussiantoken_jax.models.discriminator import PatchDiscriminator
from gaussiantoken_jax.models.encoder_decoder import GROUP_NORM_EPS, GroupNorm

EPS32 = float(np.finfo(np.float32).eps)
_NHWC = ("NHWC", "HWIO", "NHWC")


def _strides(stride):
  return stride if isinstance(stride, tuple) else (stride, stride)


def plain_conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, _strides(stride), padding, dimension_numbers=_NHWC)


def im2col_conv(x, w, stride, padding):
  return conv.im2col_conv(x, w, _strides(stride), padding)


def _with_grads(fn, stride, padding):
  """jit of (x, w, cotangent) -> (output, d x, d w)."""
  def run(x, w, cotangent):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, stride, padding), x, w)
    return (out, *vjp(cotangent))
  return jax.jit(run)


# (x shape, kernel shape, stride, padding): the discriminator's convs on 32-pixel inputs that the CPU path
# rewrites (conv_3 on its 4x4 map, conv_4 on 3x3), VGG16's block 5 on 2x2 maps, and two stride-2 shapes
# (the discriminator's conv_2, which keeps the plain path, and a stride-2 window larger than its 3x3 map), and
# unequal strides (rows 2, columns 1), where a row stride used for the columns would go unseen otherwise.
CASES = {
    "stride_2x1_nonsquare": ((2, 5, 6, 16), (4, 4, 16, 8), (2, 1), ((1, 0), (0, 1))),
    "disc_conv3_4x4": ((2, 4, 4, 256), (4, 4, 256, 512), 1, ((1, 1), (1, 1))),
    "disc_conv4_3x3": ((2, 3, 3, 512), (4, 4, 512, 1), 1, ((1, 1), (1, 1))),
    "vgg_block5_2x2": ((2, 2, 2, 512), (3, 3, 512, 512), 1, ((1, 1), (1, 1))),
    "disc_conv2_stride2": ((2, 8, 8, 128), (4, 4, 128, 256), 2, ((1, 1), (1, 1))),
    "stride2_3x3_unpadded": ((2, 5, 3, 64), (4, 4, 64, 32), 2, ((0, 1), (1, 0))),
}


def _assert_equals_plain_conv(fn, case, x_shape, w_shape, stride, padding, seed):
  """`fn`'s output and gradients against lax's convolution, within the float32 bound of the module docstring."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  out_shape = jax.eval_shape(lambda a, b: plain_conv(a, b, stride, padding), x, w).shape
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  plain = _with_grads(plain_conv, stride, padding)
  got = _with_grads(fn, stride, padding)(x, w, cotangent)
  want = plain(x, w, cotangent)
  magnitude = plain(jnp.abs(x), jnp.abs(w), jnp.abs(cotangent))
  kh, kw, c_in, c_out = w_shape
  terms = (kh * kw * c_in, kh * kw * c_out, x_shape[0] * out_shape[1] * out_shape[2])
  for name, g, r, m, n in zip(("output", "d x", "d w"), got, want, magnitude, terms):
    assert g.shape == r.shape, name
    excess = np.max(np.abs(np.asarray(g) - np.asarray(r)) - 4 * EPS32 * np.sqrt(n) * np.asarray(m))
    assert excess <= 0, f"{case}: {name} differs beyond float32 rounding (by {excess:.3g} over the bound)"


@pytest.mark.parametrize("case", list(CASES))
def test_im2col_equals_plain_conv_values_and_gradients(case):
  _assert_equals_plain_conv(im2col_conv, case, *CASES[case], seed=0)


@pytest.mark.parametrize("kernel, input_hw, output_hw, expected", [
    ((4, 4), (32, 32), (16, 16), False),  # discriminator conv_0 .. conv_2 at 32 px
    ((4, 4), (8, 8), (4, 4), False),
    ((4, 4), (4, 4), (3, 3), True),       # conv_3: only its input gradient (4x4 window on the 3x3 map) swaps
    ((4, 4), (3, 3), (2, 2), True),       # conv_4
    ((3, 3), (4, 4), (4, 4), False),      # VGG16 block 4 at 32 px
    ((3, 3), (2, 2), (2, 2), True),       # VGG16 block 5 at 32 px
    ((3, 3), (2, 2), (4, 4), True),       # a kernel-gradient window (the output map) larger than the input
    ((1, 1), (2, 2), (4, 4), True),       # ... and only that one (a padded 1x1 kernel)
    ((4, 4), (31, 31), (30, 30), False),  # 256 px discriminator's last conv
])
def test_window_exceeds_map(kernel, input_hw, output_hw, expected):
  assert conv.window_exceeds_map(kernel, input_hw, output_hw) is expected


def _count_convs(fn, *args) -> int:
  """Convolutions in the jaxpr of `fn`, those inside `_stride1_conv`'s custom_vjp call included."""
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated[")


def _discriminator_convs(size: int) -> int:
  module = PatchDiscriminator(ndf=8)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda key, x: module.init(key, x, train=False), jax.random.key(0), images)
  return _count_convs(lambda v, x: module.apply(v, x, train=False), variables, images)


def _lpips_convs(size: int) -> int:
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(LPIPS().init, jax.random.key(0), images, images)
  return _count_convs(lambda p, x, y: LPIPS().apply(p, x, y), params, images, images)


def test_cpu_uses_im2col_exactly_where_a_window_exceeds_its_map(monkeypatch):
  assert jax.default_backend() == "cpu"
  # 32 px: the discriminator's conv_3 and conv_4, and VGG16's three block-5 convs, become dots; the other
  # convolutions (3 + 10, and LPIPS's five 1x1 heads) stay convolutions. 64 px: nothing changes.
  assert _discriminator_convs(32) == 3 and _discriminator_convs(64) == 5
  assert _lpips_convs(32) == 10 + 5 and _lpips_convs(64) == 13 + 5
  # A one-pixel output (a 4x4 window over a 4x4 map, unpadded) is a window larger than its output map too.
  one_pixel = jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.float32), jax.ShapeDtypeStruct((4, 4, 8, 8), jnp.float32)
  assert _count_convs(lambda a, b: conv.conv_general_dilated(a, b, (1, 1), ((0, 0), (0, 0)), dimension_numbers=_NHWC),
                      *one_pixel) == 0
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # other backends: always the plain convolution
  assert _discriminator_convs(32) == 5 and _lpips_convs(32) == 13 + 5


def stride1_conv(x, w, stride, padding):
  assert stride == 1
  return conv._stride1_conv(x, w, padding, None)  # pylint: disable=protected-access


# (x shape, kernel shape, padding): the encoder / decoder's 3x3 convolutions (PyTorch's padding 1) and 1x1
# shortcuts, uneven padding, and an even kernel (the discriminator's 4x4 with padding 1 on larger maps).
STRIDE1_CASES = {
    "3x3_pad1_64_to_32": ((2, 16, 16, 64), (3, 3, 64, 32), ((1, 1), (1, 1))),
    "1x1_32_to_64": ((2, 8, 8, 32), (1, 1, 32, 64), ((0, 0), (0, 0))),
    "3x3_uneven_pad_nonsquare": ((2, 9, 7, 16), (3, 3, 16, 8), ((0, 2), (2, 0))),
    "4x4_pad1": ((2, 10, 10, 8), (4, 4, 8, 12), ((1, 1), (1, 1))),
}


@pytest.mark.parametrize("case", list(STRIDE1_CASES))
def test_stride1_conv_equals_plain_conv_values_and_gradients(case):
  """The explicit HWIO input gradient (and autodiff's kernel gradient) against lax's own, to float32 rounding
  (the bound of the module docstring; a kernel flipped along one axis only, or not transposed, misses it)."""
  x_shape, w_shape, padding = STRIDE1_CASES[case]
  _assert_equals_plain_conv(stride1_conv, case, x_shape, w_shape, 1, padding, seed=2)


def test_cpu_takes_the_stride1_form_for_stride1_convolutions_only(monkeypatch):
  x, w = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 4))

  def form(stride, padding=((1, 1), (1, 1))):
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv.conv_general_dilated(
        a, b, (stride, stride), padding, dimension_numbers=_NHWC))(x, w))
    return "_stride1_conv" in jaxpr

  assert form(1) and not form(2) and not form(1, "SAME")
  assert not form(1, ((3, 3), (1, 1)))  # padding beyond k - 1: autodiff's input gradient would need a crop
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not form(1)


# Forms neither rewrite handles, which must reach lax unchanged: kernel and input dilation, feature groups, negative
# padding, another layout. Each has a window larger than its map or stride 1, so a missing check would send it to
# im2col + dot or to `_stride1_conv`. (x shape, kernel shape, keyword arguments of conv_general_dilated.)
LAX_ONLY_FORMS = {
    "kernel_dilation": ((1, 3, 3, 4), (3, 3, 4, 4), dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))),
    "input_dilation": ((1, 3, 3, 4), (3, 3, 4, 4), dict(padding=((1, 1), (1, 1)), lhs_dilation=(2, 2))),
    "feature_groups": ((1, 3, 3, 4), (3, 3, 2, 4), dict(padding=((1, 1), (1, 1)), feature_group_count=2)),
    "negative_padding": ((1, 4, 4, 4), (3, 3, 4, 4), dict(padding=((-1, 0), (0, 0)))),
    "nchw_oihw": ((1, 4, 3, 3), (8, 4, 4, 4), dict(padding=((1, 1), (1, 1)),
                                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))),
}


@pytest.mark.parametrize("form", list(LAX_ONLY_FORMS))
def test_forms_the_rewrites_do_not_handle_equal_lax(form):
  """Values and gradients against lax's own, within the float32 bound of the module docstring taken with n =
  every element of x and w (more terms than any one sum has); a rewrite that ignored the form fails or is off by
  about the outputs' own size."""
  x_shape, w_shape, kwargs = LAX_ONLY_FORMS[form]
  kwargs = {"dimension_numbers": _NHWC, **kwargs}
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)

  def with_grads(fn):
    def run(a, b, cotangent):
      out, vjp = jax.vjp(lambda a, b: fn(a, b, (1, 1), **kwargs), a, b)
      return (out, *vjp(cotangent))
    return jax.jit(run)

  want_fn = with_grads(jax.lax.conv_general_dilated)
  cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), **kwargs), x, w).shape), jnp.float32)
  want = want_fn(x, w, cotangent)
  magnitude = want_fn(jnp.abs(x), jnp.abs(w), jnp.abs(cotangent))
  got = with_grads(conv.conv_general_dilated)(x, w, cotangent)
  bound = 4 * EPS32 * np.sqrt(x.size + w.size)
  for name, g, r, m in zip(("output", "d x", "d w"), got, want, magnitude):
    assert g.shape == r.shape, name
    assert np.all(np.abs(np.asarray(g) - np.asarray(r)) <= bound * np.asarray(m)), f"{form}: {name}"


def test_im2col_keeps_the_preferred_element_type():
  """bfloat16 operands with float32 accumulation asked for (a 4x4 window over a 3x3 map: im2col + dot): float32
  out, equal to lax's to float32 rounding (the products of two bfloat16 are exact in float32; n = 4*4*4 terms)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 3, 3, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 4, 4, 8)), jnp.bfloat16)
  args = ((1, 1), ((1, 1), (1, 1)))
  got = conv.conv_general_dilated(x, w, *args, dimension_numbers=_NHWC, preferred_element_type=jnp.float32)
  want = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=_NHWC, preferred_element_type=jnp.float32)
  magnitude = jax.lax.conv_general_dilated(jnp.abs(x), jnp.abs(w), *args, dimension_numbers=_NHWC,
                                           preferred_element_type=jnp.float32)
  assert got.dtype == want.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= 4 * EPS32 * np.sqrt(4 * 4 * 4) * np.asarray(magnitude))


def test_conv_module_keeps_nn_conv_parameters():
  x = jnp.zeros((1, 3, 3, 5))
  ours = conv.Conv(7, (4, 4), padding=((1, 1), (1, 1)), name="c").init(jax.random.key(0), x)
  theirs = nn.Conv(7, (4, 4), padding=((1, 1), (1, 1)), name="c").init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
  np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])


def test_discriminator_equals_plain_convs_values_and_gradients(monkeypatch):
  """Train-mode discriminator on 32 px: logits and gradients (parameters and images) as with nn.Conv."""
  module = PatchDiscriminator(ndf=16)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  variables = module.init(jax.random.key(0), images, train=False)
  cotangent = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)

  def logits_and_grads(params, x):  # a new function per call: jit must trace it again, not reuse its cache
    def run(params, x):
      def f(p, a):
        return module.apply({"params": p, "batch_stats": variables["batch_stats"]}, a, train=True,
                            mutable=["batch_stats"])[0]
      out, vjp = jax.vjp(f, params, x)
      return out, vjp(cotangent)
    return jax.jit(run)(params, x)

  got = logits_and_grads(variables["params"], images)
  monkeypatch.setattr(conv, "_simple_cpu_conv", lambda *a: False)  # lax's own convolutions throughout
  want = logits_and_grads(variables["params"], images)
  # Train-mode BatchNorm divides by the batch std: compare each leaf relative to its own scale, at the bound
  # of the widest sum (conv_3's 4*4*64 = 1024 terms): 4 * eps * sqrt(1024) = 1.5e-5 (measured: 1e-6 or less).
  tolerance = 4 * EPS32 * np.sqrt(16 * 64)
  for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    r, g = np.asarray(r), np.asarray(g)
    assert np.max(np.abs(g - r)) <= tolerance * np.max(np.abs(r)), jax.tree_util.keystr(path)


# (shape, mean, std, affine): the encoder's and decoder's CIFAR widths (G = 32), a large mean (the two-pass
# variance's case), and a variance near epsilon without scale and bias (AdaGN's inner norm), where a misplaced
# or wrong epsilon shows.
GROUP_NORM_CASES = {
    "32x32x128": ((2, 32, 32, 128), 0.0, 1.0, True),
    "16x16x256_mean100": ((2, 16, 16, 256), 100.0, 1.0, True),
    "8x8x64_var_near_eps_no_affine": ((2, 8, 8, 64), 0.0, 1e-3, False),
}


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", list(GROUP_NORM_CASES))
def test_group_norm_equals_flax_group_norm_values_and_gradients(case, backend, monkeypatch):
  """GroupNorm + swish against nn.GroupNorm(two-pass) + swish; "gpu" traces the non-CPU reduction on the CPU."""
  shape, mean, std, affine = GROUP_NORM_CASES[case]
  channels = shape[-1]
  rng = np.random.default_rng(0)
  x = jnp.asarray(mean + std * (rng.normal(size=shape) + rng.normal(size=(channels,))), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {"scale": jnp.asarray(1 + rng.normal(size=(channels,)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(channels,)), jnp.float32)} if affine else {}
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=GROUP_NORM_EPS, use_scale=affine, use_bias=affine,
                           dtype=jnp.float32, use_fast_variance=False)

  def values_and_grads(module):
    def run(p, a):
      out, vjp = jax.vjp(lambda p, a: nn.swish(module.apply({"params": p}, a)), p, a)
      return out, vjp(cotangent)
    return jax.jit(run)(params, x)

  want = values_and_grads(flax_norm)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  got = values_and_grads(GroupNorm(32, use_scale=affine, use_bias=affine))
  n = shape[1] * shape[2] * channels // 32
  tolerance = 4 * EPS32 * np.sqrt(n) * (1 + abs(mean) / (std * np.sqrt(2)))
  for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    r, g = np.asarray(r), np.asarray(g)
    assert g.shape == r.shape
    assert np.max(np.abs(g - r)) <= tolerance * np.max(np.abs(r)), f"{case} {backend} {jax.tree_util.keystr(path)}"
