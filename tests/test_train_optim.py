"""Learning-rate schedule, Adam(W) and weight EMA against float64 NumPy versions of their formulas."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussiantoken_jax.train import optim


def _opt_cfg(**overrides):
  cfg = dict(name="adamw", learning_rate=0.1, init_learning_rate=0.01, b1=0.9, b2=0.999, weight_decay=0.05,
             warmup_steps=2, grad_clip_norm=0.0)
  cfg.update(overrides)
  return cfg


def _numpy_timm_cosine(t, peak, init, warmup, total):
  """timm CosineLRScheduler(t_initial=total, lr_min=0, warmup_t=warmup, warmup_lr_init=init), per step."""
  if t < warmup:
    return init + t * (peak - init) / warmup
  if t >= total:
    return 0.0
  return 0.5 * peak * (1.0 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_matches_timm_formula(warmup):
  total = 40
  schedule = optim.make_schedule(_opt_cfg(learning_rate=2e-4, init_learning_rate=1e-6, warmup_steps=warmup), total)
  steps = [0, 1, 3, 4, 5, 6, 17, 20, 39, 40, 55]
  got = np.asarray([schedule(s) for s in steps], np.float64)
  want = np.asarray([_numpy_timm_cosine(s, 2e-4, 1e-6, warmup, total) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  # The warm-up really starts at init_learning_rate and the decay really ends at 0.
  assert got[0] == pytest.approx(1e-6 if warmup else 2e-4, rel=1e-5)
  assert got[steps.index(40)] == 0.0


def test_schedule_is_traceable():
  schedule = optim.make_schedule(_opt_cfg(), 10)
  got = jax.jit(jax.vmap(schedule))(jnp.arange(12))
  want = [_numpy_timm_cosine(t, 0.1, 0.01, 2, 10) for t in range(12)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)


def _tiny_params():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
  return model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]


def _numpy_adam_run(params, grads_per_step, cfg, total, *, coupled_l2=False):
  """Float64 torch-style Adam / AdamW (eps outside the sqrt, bias-corrected), global-norm clipping first."""
  p = [np.asarray(x, np.float64) for x in params]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for t, grads in enumerate(grads_per_step):
    g = [np.asarray(x, np.float64) for x in grads]
    if cfg["grad_clip_norm"] > 0:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
      g = [x * min(1.0, cfg["grad_clip_norm"] / norm) for x in g]
    if coupled_l2:
      g = [gi + cfg["weight_decay"] * pi for gi, pi in zip(g, p)]
    lr = _numpy_timm_cosine(t, cfg["learning_rate"], cfg["init_learning_rate"], cfg["warmup_steps"], total)
    b1, b2 = cfg["b1"], cfg["b2"]
    for i in range(len(p)):
      m[i] = b1 * m[i] + (1 - b1) * g[i]
      v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
      m_hat = m[i] / (1 - b1 ** (t + 1))
      v_hat = v[i] / (1 - b2 ** (t + 1))
      decoupled = 0.0 if coupled_l2 else cfg["weight_decay"] * p[i]
      p[i] = p[i] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + decoupled)
  return p


@pytest.mark.parametrize("cfg", [
    _opt_cfg(),
    _opt_cfg(name="adam", weight_decay=0.0, b1=0.5, b2=0.9),
    _opt_cfg(name="adam", weight_decay=0.05),
    _opt_cfg(grad_clip_norm=0.3),
], ids=["adamw", "adam", "adam_l2", "adamw_clipped"])
def test_optimizer_steps_match_numpy(cfg):
  total = 10
  params = _tiny_params()
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  grads_per_step = [[rng.normal(size=x.shape).astype(np.float32) for x in leaves] for _ in range(3)]

  tx = optim.make_optimizer(cfg, total)
  opt_state = tx.init(params)
  current = params
  for grads in grads_per_step:
    updates, opt_state = tx.update(jax.tree.unflatten(treedef, grads), opt_state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)

  want = _numpy_adam_run(leaves, grads_per_step, cfg, total, coupled_l2=cfg["name"] == "adam")
  for got_leaf, want_leaf in zip(jax.tree.leaves(current), want):
    np.testing.assert_allclose(np.asarray(got_leaf, np.float64), want_leaf, rtol=1e-5, atol=1e-6)
  # The parameters did move: a zero update would have passed a loose comparison on small learning rates.
  assert not np.allclose(np.asarray(jax.tree.leaves(current)[1]), np.asarray(leaves[1]), atol=1e-3)


def test_state_layout_says_which_settings_share_the_optimizer_state_structure():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  cfgs = [_opt_cfg(), _opt_cfg(weight_decay=0.0, learning_rate=0.5), _opt_cfg(grad_clip_norm=1.0),
          _opt_cfg(name="adam", weight_decay=0.0), _opt_cfg(name="adam", weight_decay=0.05, b1=0.5),
          _opt_cfg(name="adam", weight_decay=0.05, grad_clip_norm=2.0)]
  for a in cfgs:
    for b in cfgs:
      same_structure = (jax.tree.structure(optim.make_optimizer(a, 10).init(params))
                        == jax.tree.structure(optim.make_optimizer(b, 10).init(params)))
      assert (optim.state_layout(a) == optim.state_layout(b)) == same_structure, (a, b)


@pytest.mark.parametrize("bad, message", [
    (dict(name="sgd"), "opt_cfg.name"),
    (dict(b2=1.0), "opt_cfg.b2"),
    (dict(learning_rate=-1.0), "opt_cfg.learning_rate"),
    (dict(warmup_steps=11), "opt_cfg.warmup_steps"),
    (dict(warmup_steps=1.5), "opt_cfg.warmup_steps"),
])
def test_optimizer_rejects_bad_config(bad, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(_opt_cfg(**bad), 10)


def test_optimizer_rejects_missing_field_and_bad_total_steps():
  cfg = _opt_cfg()
  del cfg["grad_clip_norm"]
  with pytest.raises(ValueError, match="grad_clip_norm"):
    optim.make_schedule(cfg, 10)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(_opt_cfg(), 0)


def test_ema_update_matches_numpy():
  params = _tiny_params()
  rng = np.random.default_rng(1)
  ema = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  got = jax.jit(optim.ema_update)(ema, params, 0.999)
  for g, e, p in zip(jax.tree.leaves(got), jax.tree.leaves(ema), jax.tree.leaves(params)):
    want = 0.999 * np.asarray(e, np.float64) + 0.001 * np.asarray(p, np.float64)
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-6, atol=1e-7)
  # A bfloat16 EMA of float32 parameters stays bfloat16 (each result keeps its EMA leaf's dtype), rounded once:
  # within half a bfloat16 ulp (7 stored mantissa bits: at most 2^-8 relative) of the float64 formula on the
  # bfloat16 inputs.
  ema16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ema)
  for g, e, p in zip(jax.tree.leaves(optim.ema_update(ema16, params, 0.9)), jax.tree.leaves(ema16),
                     jax.tree.leaves(params)):
    assert g.dtype == jnp.bfloat16
    want = 0.9 * np.asarray(e, np.float64) + 0.1 * np.asarray(p, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=2 ** -8, atol=1e-30)


def test_ema_update_rejects_bad_input():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="tree structure"):
    optim.ema_update({"a": jnp.ones(3)}, params, 0.9)
  with pytest.raises(ValueError, match="shape"):
    optim.ema_update({"a": jnp.ones(3), "b": jnp.ones(4)}, params, 0.9)
  with pytest.raises(ValueError, match="decay"):
    optim.ema_update(params, params, 1.5)
