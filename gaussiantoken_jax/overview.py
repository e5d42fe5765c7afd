"""Model overview for `main --dry_run`: parameter counts per component and forward FLOPs, with nothing materialised.

Shapes come from `jax.eval_shape` and FLOPs from XLA's cost analysis of the lowered forward pass, so even the
ImageNet model is "built" in seconds on a laptop without allocating its weights.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from gaussiantoken_jax import models

COMPONENTS = ("encoder", "embedder", "quantizer", "decoder", "discriminator")


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def abstract_variables(config: ml_collections.ConfigDict):
  """Shapes of the generator's and discriminator's variables (no allocation)."""
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  rngs = {name: jax.random.key(0) for name in ("params", "dropout", "quantizer")}
  model, disc = models.build_model(config), models.build_discriminator(config)
  gen_vars = jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)
  disc_vars = jax.eval_shape(lambda x: disc.init(rngs, x, train=False), images)
  return model, images, gen_vars, disc_vars


def forward_gflops(model, gen_vars, images) -> float:
  """GFLOPs of one generator forward pass per image, from XLA's cost analysis of the lowered HLO."""
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(gen_vars, images)
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # some JAX versions return one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"]) / images.shape[0] / 1e9


def param_counts(gen_vars, disc_vars) -> dict[str, int]:
  """Trainable parameters per component. The quantizer has none: its codebook (reported instead) is EMA state."""
  params = gen_vars["params"]
  counts = {name: count(params.get(name, {})) for name in ("encoder", "embedder", "decoder")}
  counts["quantizer"] = count(gen_vars["codebook"]["quantizer"]["embed"])
  counts["discriminator"] = count(disc_vars["params"])
  return {name: counts[name] for name in COMPONENTS}


def describe(gen_vars, disc_vars) -> str:
  """A readable table: every component and its first-level submodules, with parameter counts."""
  lines = [f"{'module':<48}{'params':>14}", "-" * 62]
  trees = dict(gen_vars["params"])
  trees["discriminator"] = disc_vars["params"]
  for name, tree in trees.items():
    lines.append(f"{name:<48}{count(tree):>14,}")
    for sub, subtree in tree.items():
      lines.append(f"  {sub:<46}{count(subtree):>14,}")
  for collection in sorted(set(gen_vars) - {"params"}):
    lines.append(f"{'[' + collection + '] (state, not trained)':<48}{count(gen_vars[collection]):>14,}")
  return "\n".join(lines)


def tokens(model, gen_vars, images) -> dict[str, int]:
  """What one image becomes: {"tokens": codebook indices per image (K Gaussians, or the h*w grid of the VQ
  baseline), "token_dim": the size of each quantized vector (z), "codebook_size": codes}."""
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), gen_vars, images)
  codebook_size, token_dim = gen_vars["codebook"]["quantizer"]["embed"].shape
  return {"tokens": math.prod(out.indices.shape[1:]), "token_dim": token_dim, "codebook_size": codebook_size}


def dry_run(config: ml_collections.ConfigDict) -> tuple[str, dict]:
  """(printable overview, the dry-run summary dict {"params": {...}, "gflops_per_image": x, "tokens": K,
  "token_dim": z, "codebook_size": n})."""
  model, images, gen_vars, disc_vars = abstract_variables(config)
  summary = {"params": param_counts(gen_vars, disc_vars),
             "gflops_per_image": round(forward_gflops(model, gen_vars, images), 3),
             **tokens(model, gen_vars, images)}
  generator = sum(v for k, v in summary["params"].items() if k not in ("quantizer", "discriminator"))
  text = (f"{describe(gen_vars, disc_vars)}\n\nmodel type {config.model.type}, image "
          f"{config.data.image_size}x{config.data.image_size}, generator {generator:,} trainable parameters, "
          f"{summary['gflops_per_image']} GFLOPs per image (forward)\n"
          f"{summary['tokens']} tokens per image, each a code of dimension {summary['token_dim']} from a codebook "
          f"of {summary['codebook_size']}")
  return text, summary
