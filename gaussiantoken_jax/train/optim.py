"""Optimizers, learning-rate schedule and weight EMA, as the reference trains them.

The reference builds both optimizers (autoencoder and discriminator) with timm and steps a timm
`CosineLRScheduler` once per generator step:

* AdamW (CIFAR, Mini-ImageNet) or Adam (ImageNet), on plain parameter lists, so weight decay hits every
  parameter, norms and biases included;
* linear warm-up from `init_learning_rate` to `learning_rate`, then cosine decay to 0 at `total_steps`;
* no gradient clipping (our `grad_clip_norm` defaults to off);
* a weight EMA with a constant decay of 0.999, applied after every step.

`opt_cfg` is a mapping (`ml_collections.ConfigDict` or dict) with the fields `name` ("adam" | "adamw"),
`learning_rate`, `init_learning_rate`, `b1`, `b2`, `weight_decay`, `warmup_steps` and `grad_clip_norm`
(0 = off).

The learning rate used by update number `step` (0-based, i.e. the optimizer's own count before the update)
is `make_schedule(opt_cfg, total_steps)(step)`: evaluate it at the step to log it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZER_NAMES = ("adam", "adamw")
_FIELDS = ("name", "learning_rate", "init_learning_rate", "b1", "b2", "weight_decay", "warmup_steps",
           "grad_clip_norm")
# torch.optim.Adam(W)'s default, which the reference leaves unchanged.
_ADAM_EPS = 1e-8


def _read_opt_cfg(opt_cfg: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
  """Returns the optimizer fields as a plain dict, after checking every one of them."""
  if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
    raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r} (a config that states its "
                     "durations in epochs goes through config_lib.resolve_steps first).")
  missing = [name for name in _FIELDS if name not in opt_cfg]
  if missing:
    raise ValueError(f"`opt_cfg` lacks the field(s) {missing}; it must have all of {list(_FIELDS)}.")
  cfg = {name: opt_cfg[name] for name in _FIELDS}
  if cfg["name"] not in OPTIMIZER_NAMES:
    raise ValueError(f"`opt_cfg.name` must be one of {OPTIMIZER_NAMES}, got {cfg['name']!r}.")
  for name in ("learning_rate", "init_learning_rate", "weight_decay", "grad_clip_norm"):
    if not isinstance(cfg[name], (int, float)) or isinstance(cfg[name], bool) or cfg[name] < 0:
      raise ValueError(f"`opt_cfg.{name}` must be a number >= 0, got {cfg[name]!r}.")
  for name in ("b1", "b2"):
    if not isinstance(cfg[name], (int, float)) or not 0.0 <= cfg[name] < 1.0:
      raise ValueError(f"`opt_cfg.{name}` must be a number in [0, 1), got {cfg[name]!r}.")
  warmup = cfg["warmup_steps"]
  if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup <= total_steps:
    raise ValueError(f"`opt_cfg.warmup_steps` must be an int in [0, total_steps={total_steps}], got {warmup!r}.")
  return cfg


def make_schedule(opt_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """timm's `CosineLRScheduler` (per step, one cycle, lr_min 0, warmup_prefix False) as an optax schedule.

  lr(t) = init + t * (peak - init) / warmup_steps         for t < warmup_steps,
  lr(t) = 0.5 * peak * (1 + cos(pi * t / total_steps))    for warmup_steps <= t < total_steps,
  lr(t) = 0                                               for t >= total_steps.

  As in timm (warmup_prefix=False) the cosine runs on the raw step t, not on t - warmup_steps, so it reaches
  exactly 0 at total_steps and starts a little below the peak right after the warm-up.
  """
  cfg = _read_opt_cfg(opt_cfg, total_steps)
  peak = float(cfg["learning_rate"])
  init = float(cfg["init_learning_rate"])
  warmup = cfg["warmup_steps"]
  # The warm-up slope; unused (and kept finite) when there is no warm-up.
  slope = (peak - init) / max(warmup, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warming = init + t * slope
    # 0.5 * (1 + cos(pi * t / T)) == sin(pi * (T - t) / (2T))^2, which keeps float32 precision near the end
    # of training, where 1 + cos(...) would cancel; it is also exactly 0 from T on.
    remaining = jnp.maximum(total_steps - t, 0.0)
    cosine = peak * jnp.sin(remaining * (0.5 * math.pi / total_steps)) ** 2
    return jnp.where(t < warmup, warming, cosine)

  return schedule


def state_layout(opt_cfg: Mapping[str, Any]) -> str:
  """The stages `make_optimizer` chains, which fix the structure of its state: a checkpoint's optimizer state
  restores under settings with the same layout (the learning rate, betas or decay strength may change)."""
  stages = []
  if opt_cfg.get("grad_clip_norm", 0) > 0:  # .get: a saved config may predate a field
    stages.append("global-norm clipping")
  if opt_cfg["name"] == "adam" and opt_cfg.get("weight_decay", 0) > 0:
    stages.append("coupled L2 decay")
  return " + ".join([*stages, opt_cfg["name"]])


def make_optimizer(opt_cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """Adam or AdamW on the schedule of `make_schedule`, with optional global-norm clipping first.

  "adamw" is decoupled weight decay (torch.optim.AdamW: p <- p - lr * (adam_step + weight_decay * p)).
  "adam" with weight_decay > 0 is torch.optim.Adam's coupled L2 (the decay is added to the gradient before
  the moments), which is what timm's "adam" does; the reference's Adam config uses weight_decay 0. Both decay
  every parameter, as the reference does (timm got plain parameter lists and could not exclude any).
  """
  cfg = _read_opt_cfg(opt_cfg, total_steps)
  schedule = make_schedule(opt_cfg, total_steps)
  if cfg["name"] == "adamw":
    optimizer = optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=_ADAM_EPS, weight_decay=cfg["weight_decay"])
  else:
    optimizer = optax.adam(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=_ADAM_EPS)
    if cfg["weight_decay"] > 0:
      optimizer = optax.chain(optax.add_decayed_weights(cfg["weight_decay"]), optimizer)
  if cfg["grad_clip_norm"] > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(cfg["grad_clip_norm"]), optimizer)
  return optimizer


def ema_update(ema_params, params, decay):
  """One step of the weight EMA: ema <- decay * ema + (1 - decay) * params, leaf by leaf.

  Written as ema - (1 - decay) * (ema - params), the form LitEma uses, which loses less precision when decay
  is close to 1. Each result keeps the dtype of its EMA leaf. `decay` may be a Python float (the train
  step passes `config.ema_decay`) or a traced scalar.
  """
  ema_structure = jax.tree.structure(ema_params)
  params_structure = jax.tree.structure(params)
  if ema_structure != params_structure:
    raise ValueError(
        f"ema_update: `params` must have the tree structure of `ema_params`, got {params_structure} "
        f"vs {ema_structure}.")
  if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
    raise ValueError(f"ema_update: `decay` must be in [0, 1], got {decay!r}.")
  if hasattr(decay, "shape") and jnp.ndim(decay) != 0:
    raise ValueError(f"ema_update: `decay` must be a scalar, got shape {jnp.shape(decay)}.")

  def update_leaf(path, ema, param):
    if jnp.shape(ema) != jnp.shape(param):
      raise ValueError(
          f"ema_update: leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(param)} in `params` but "
          f"{jnp.shape(ema)} in `ema_params`.")
    ema = jnp.asarray(ema)
    return (ema - (1.0 - decay) * (ema - param)).astype(ema.dtype)

  return jax.tree_util.tree_map_with_path(update_leaf, ema_params, params)
