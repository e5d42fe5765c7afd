"""Diagnostic for the learning issue: overfit ONE fixed batch of held-out demo crops, eval-mode PSNR per step.

No GAN, no LPIPS, no EMA: L1 + 0.25 commitment, Adam. Prints the trivial block-average baselines of the same
batch, then every --every steps the train L1, eval PSNR and what the Gaussians look like (spread of the centres
across images and within one, scale range, spread of the features across images and overall), and the gradient
norm per module at the first and last step.

  --mode embed    the model as built (default)
  --mode gridpos  the embedder's features, but centres on a fixed 8x8 grid, scale 1, rotation 0
  --mode grid     fixed 8x8 grid AND features = the first z channels of the 2x2-pooled encoder map (no embedder)
  --quant 0       skip the quantizer (continuous features)
  --stream 1      train on fresh random crops of the demo's training photos (batch 16, the demo's loader) instead
                  of the fixed batch; the fixed held-out batch is then a true held-out set, and the line also
                  gives eval-mode PSNR on 64 other training-distribution crops ("trainpsnr") and their 8x8 baseline
  --warmup N      linear learning-rate warm-up over N steps from 1e-6 (0: constant)
  --clip X        clip the gradient's global norm to X before Adam (0: no clipping)
  --image_lr X    multiply the learning rate of the image side (conv encoder, the embedder's input projection,
                  norm and deformable self-attention encoder) by X

  python benchmarks/overfit_fixed_batch.py --steps 150 --quant 0 --mode grid
  python benchmarks/overfit_fixed_batch.py --stream 1 --n 64 --warmup 50 --steps 300 --every 100 --mode grid
"""
import argparse, time, sys, os
import numpy as np
import jax, jax.numpy as jnp, optax
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import demo as demo_cfg
from gaussiantoken_jax import models
from gaussiantoken_jax.data import demo as demo_data

p = argparse.ArgumentParser()
p.add_argument("--variant", default="")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--quant", type=int, default=1)
p.add_argument("--dropout", type=float, default=-1)
p.add_argument("--n", type=int, default=16)
p.add_argument("--every", type=int, default=50)
p.add_argument("--set", action="append", default=[])
p.add_argument("--offset", type=int, default=0)
p.add_argument("--mode", default="embed")
p.add_argument("--grid_scale", type=float, default=1.0)
p.add_argument("--stream", type=int, default=0)
p.add_argument("--warmup", type=int, default=0)
p.add_argument("--clip", type=float, default=0.0)
p.add_argument("--image_lr", type=float, default=1.0)
a = p.parse_args()

cfg = demo_cfg.get_config(a.variant or None)
if a.dropout >= 0: cfg.model.embedder.dropout = a.dropout
for s in a.set:
  k, v = s.split("="); node = cfg
  *path, last = k.split(".")
  for q in path: node = node[q]
  node[last] = v if isinstance(node[last], str) else eval(v)
src = demo_data.DemoEvalSource(32)
imgs = np.stack([src[i]["data"] for i in range(a.offset, a.offset + a.n)])
to_input = lambda images: jnp.asarray(images, jnp.float32) / 127.5 - 1.0
x = to_input(imgs)
if a.stream:
  from gaussiantoken_jax.data import pipeline
  cfg.batch_size = 16
  train_batches = iter(pipeline.make_train_loader(cfg))
  cfg_other = cfg.copy_and_resolve_references()
  cfg_other.seed = cfg.seed + 1  # other crops of the training photos, fixed for the whole run
  other_batches = iter(pipeline.make_train_loader(cfg_other))
  x_train_dist = jnp.concatenate([to_input(next(other_batches)["image"]) for _ in range(4)])

def block(x, b):
  n, h, w, c = x.shape
  m = x.reshape(n, h // b, b, w // b, b, c).mean((2, 4), keepdims=True)
  return jnp.broadcast_to(m, (n, h // b, b, w // b, b, c)).reshape(x.shape)

def psnr(x, y):
  mse = jnp.mean(((jnp.clip(y, -1, 1) - x) * 0.5) ** 2, axis=(1, 2, 3))
  return float(jnp.mean(-10 * jnp.log10(mse)))
print("baselines: mean", psnr(x, block(x, 32)), "4x4", psnr(x, block(x, 8)), "8x8", psnr(x, block(x, 4)))

model = models.build_model(cfg)
is_gt = cfg.model.type == "gaussiantoken"

def fwd(m, x, train, quant):
  if not is_gt:
    out = m(x, train=train)
    return out.reconstruction, out.commitment_loss, out
  feats = m.encoder(x)
  if a.mode in ("grid", "gridpos"):
    B, h, w, _ = feats.shape
    pooled = feats.reshape(B, h // 2, 2, w // 2, 2, -1).mean((2, 4)).reshape(B, (h // 2) * (w // 2), -1)
    g = m.embedder(feats, train=train)
    centres = (jnp.arange(w // 2) + 0.5) / (w // 2) * 2 - 1
    mx, my = jnp.meshgrid(centres, centres, indexing="xy")
    means = jnp.broadcast_to(jnp.stack([mx, my], -1).reshape(1, -1, 2), (B, mx.size, 2))
    g = g.replace(means=means, scales=jnp.full_like(g.scales, a.grid_scale), rotations=jnp.zeros_like(g.rotations),
                  features=pooled[..., :cfg.model.feature_dim] if a.mode == "grid" else g.features)
  else:
    g = m.embedder(feats, train=train)
  if quant:
    q, vq = m.quantizer(g.features, train=train)
    g2 = g.replace(features=q); commit = vq.commitment_loss
  else:
    g2 = g; commit = jnp.zeros(()); vq = None
  return m.decode(g2), commit, (g, vq)

key = jax.random.PRNGKey(0)
variables = model.init({"params": key, "dropout": key, "quantizer": key}, x[:1], train=False)
params = variables["params"]; state = {k: v for k, v in variables.items() if k != "params"}
tx = optax.adam(optax.linear_schedule(1e-6, a.lr, a.warmup) if a.warmup else a.lr)
if a.image_lr != 1.0:
  image_side = lambda path: path[0] == "encoder" or (path[0] == "embedder" and path[1] in
                                                      ("encoder", "input_proj", "input_norm"))
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "image" if image_side([k.key for k in path]) else "rest", params)
  tx = optax.multi_transform({"image": optax.chain(tx, optax.scale(a.image_lr)), "rest": tx}, labels)
if a.clip:
  tx = optax.chain(optax.clip_by_global_norm(a.clip), tx)
opt = tx.init(params)

@jax.jit
def step(params, state, opt, key, x):
  k1, k2 = jax.random.split(key)
  def loss_fn(p):
    (rec, commit, _), new_state = model.apply({"params": p, **state}, x, train=True, quant=a.quant,
                                              method=fwd, mutable=list(state), rngs={"dropout": k1, "quantizer": k2})
    l1 = jnp.mean(jnp.abs(rec - x))
    return l1 + 0.25 * commit, (l1, new_state)
  (loss, (l1, new_state)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  norms = {k: optax.tree.norm(v) for k, v in g.items()}
  if is_gt:
    norms.update({"emb/" + k: optax.tree.norm(v) for k, v in g["embedder"].items()})
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), new_state, opt, l1, norms

@jax.jit
def evaluate(params, state, x):
  rec, commit, aux = model.apply({"params": params, **state}, x, train=False, quant=a.quant, method=fwd)
  return rec, aux

t0 = time.time()
for i in range(1, a.steps + 1):
  x_step = to_input(next(train_batches)["image"]) if a.stream else x
  params, state, opt, l1, norms = step(params, state, opt, jax.random.fold_in(key, i), x_step)
  if i % a.every == 0 or i == 1:
    rec, aux = evaluate(params, state, x)
    line = f"step {i} l1 {float(l1):.4f} evalpsnr {psnr(x, rec):.2f}"
    if a.stream:
      line += (f" trainpsnr {psnr(x_train_dist, evaluate(params, state, x_train_dist)[0]):.2f}"
               f" (8x8 {psnr(x_train_dist, block(x_train_dist, 4)):.2f})")
    line += f" t {time.time()-t0:.0f}s"
    if is_gt:
      g = aux[0]
      line += (f" | mean-std-across-img {float(jnp.std(g.means, axis=0).mean()):.3f} within {float(jnp.std(g.means, axis=1).mean()):.3f}"
               f" scales {float(g.scales.min()):.2f}-{float(g.scales.max()):.2f} med {float(jnp.median(g.scales)):.2f}"
               f" feat-std-img {float(jnp.std(g.features, axis=0).mean()):.3f} feat-std-all {float(jnp.std(g.features)):.3f}")
    print(line, flush=True)
    if i == 1 or i == a.steps:
      print("   gradnorms", {k: round(float(v), 4) for k, v in norms.items()}, flush=True)
