r"""The public PyTorch GaussianToken's CIFAR train step, timed on this machine, for the ratio to ours.

    python benchmarks/reference_step_bench.py --reference_dir=PATH [--batch_size=8] [--threads=2]

PATH is a checkout of github.com/ChrisDong-THU/GaussianToken (commit 8337223 was measured). It runs in its own
environment, not this project's: `pip install torch torchvision einops einx pyyaml pillow requests tqdm`
(nothing of this package is imported). Our side is `benchmarks/train_step_bench.py --config=configs/cifar10.py
--batch_size=8`: run the two one after the other on a quiet machine and divide (docs/benchmarks.md).

What it times, with the reference's own modules built from its `configs/cifar-gqgan-1.yaml`:
  step         the training step as `GQGAN.training_step` does it (manual optimisation), LPIPS skipped
               (`perceptual_weight=0`, as our `loss.lpips_weight = 0` row): forward, generator loss with the
               GAN term on (epoch 5; our step always computes it), backward, AdamW; discriminator loss (hinge +
               LeCAM), backward, AdamW; the weight EMA (`LitEma` over the generator, as ours; the reference's
               `LitEma(self)` also averages the discriminator's 2.8M weights, slightly more work than timed here).
               Median over `--steps` after 2 warm-ups.
  step+lpips   the same with LPIPS-VGG16 in the generator loss (weight 1.0).
  encode       images -> code indices in eval mode without autograd (encoder, embedder, quantizer).
  parts        the encoder, the embedder and the decoder, forward (no autograd) and forward + backward.

The reference cannot run on a CPU as it is; this script changes only that, at run time (the checkout is not
modified):
  - Deformable attention: Deformable-DETR's CUDA op replaced by the pure-PyTorch form the repository ships
    (`ms_deform_attn_core_pytorch`), the same mathematics.
  - Splatting: the vendored gsplat's CUDA rasterizer (whose `project_gaussians_2d_scale_rot` module the snapshot
    lacks) replaced by a dense PyTorch splat written here from the formula (`dense_splat`; it equals
    `gaussiantoken_jax.splat` with cutoff 0 to 1e-6 at the CIFAR shape), one image per call as
    `render_gaussians` loops: [64 x 256] weights per image.
  - `spconv` (imported and built by the embedder, never used by any config): an empty stand-in module.
  - LPIPS: torchvision's VGG16 with random weights instead of the downloaded ImageNet ones (the same cost).
  - The quantizer's distributed k-means asks a Lightning trainer for ranks and collectives: a one-process
    stand-in answers as a world of one would.
The numbers it reports are this machine's at that moment; compare them only with ours from the same hour.
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

import torch
import torchvision
import yaml

# The reference's own modules (`gstk`) are imported inside the functions: only after install_cpu_stand_ins.
# pylint: disable=import-outside-toplevel


def install_cpu_stand_ins(reference_dir: str):
  """Puts the reference on sys.path with the CPU stand-ins listed in the module docstring."""
  sys.path.insert(0, reference_dir)
  # Modules the reference imports that need CUDA builds or are unused: empty stand-ins.
  for name in ("MultiScaleDeformableAttention", "spconv", "spconv.pytorch", "gsplat",
               "gsplat.project_gaussians_2d_scale_rot", "gsplat.rasterize_sum"):
    sys.modules[name] = types.ModuleType(name)
  sys.modules["spconv.pytorch"].SubMConv2d = type("SubMConv2d", (torch.nn.Module,),
                                                   {"__init__": lambda self, *a, **k: torch.nn.Module.__init__(self)})
  sys.modules["spconv.pytorch"].SparseConvTensor = object
  sys.modules["gsplat.project_gaussians_2d_scale_rot"].project_gaussians_2d_scale_rot = None
  sys.modules["gsplat.rasterize_sum"].rasterize_gaussians_sum = None

  from gstk.modules.gaussianembed.ops.functions import ms_deform_attn_func
  from gstk.modules.gaussianembed.ops.modules import ms_deform_attn
  core = ms_deform_attn_func.ms_deform_attn_core_pytorch
  ms_deform_attn.MSDeformAttnFunction = types.SimpleNamespace(
      apply=lambda value, shapes, level_start, locations, weights, im2col_step: core(value, shapes, locations,
                                                                                    weights))

  from gstk.modules.gaussianembed import gaussian_render
  gaussian_render.RenderSet.post_set = lambda self, feature_dim: self  # it only made a CUDA background tensor
  gaussian_render._gaussian2image = dense_splat  # pylint: disable=protected-access

  from gstk.modules.losses import lpips
  lpips.VGG16 = lambda weights=None: torchvision.models.vgg16(weights=None)


def dense_splat(means, scales, rotations, features, render_set, opacities=None):
  """One image: sum_k exp(-0.5 d^T Sigma_k^-1 d) features_k at every pixel centre -> [C, H, W].

  means [K, 2] in [-1, 1] (x, y), scales [K, 2] in feature pixels, rotations [K, 1] in radians, features [K, C];
  the reference's Gaussians have no opacity (`include_opa: False`).
  """
  del opacities
  height, width = render_set.img_H, render_set.img_W
  py, px = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
  dx = px.reshape(1, -1) - (means[:, :1] + 1) * (0.5 * width)
  dy = py.reshape(1, -1) - (means[:, 1:2] + 1) * (0.5 * height)
  cos, sin = torch.cos(rotations.reshape(-1, 1)), torch.sin(rotations.reshape(-1, 1))
  u = (cos * dx + sin * dy) / scales[:, :1]
  v = (cos * dy - sin * dx) / scales[:, 1:2]
  weights = torch.exp(-0.5 * (u * u + v * v))  # [K, H*W]
  return (weights.t() @ features).t().reshape(-1, height, width)


class _OneProcessStrategy:
  """What a Lightning strategy's collectives return in a world of one process."""
  all_gather = staticmethod(lambda tensor: tensor.reshape(1, *tensor.shape))
  broadcast = staticmethod(lambda tensor, src=0: tensor)
  barrier = staticmethod(lambda: None)
  reduce = staticmethod(lambda tensor, reduce_op=None: tensor)


class _OneProcessTrainer:
  global_rank, world_size, is_distributed, strategy = 0, 1, False, _OneProcessStrategy()


def build(reference_dir: str, lpips_weight: float):
  """(generator, loss module with the discriminator, the two AdamW, the EMA) from cifar-gqgan-1.yaml."""
  from gstk.modules.diffusionmodules.improved_model import Decoder, Encoder
  from gstk.modules.ema import LitEma
  from gstk.modules.gaussianembed.gaussian_embed import GaussianEmbed
  from gstk.modules.gaussianembed.gaussian_render import RenderSet, render_gaussians
  from gstk.modules.gaussianembed.vq_v2 import VectorQuantize
  from gstk.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

  with open(os.path.join(reference_dir, "configs", "cifar-gqgan-1.yaml")) as f:
    cfg = yaml.safe_load(f)["model"]["init_args"]
  trainer = _OneProcessTrainer()

  class Generator(torch.nn.Module):
    """GQGAN's encode + decode, as `GQGAN.forward` composes them."""

    def __init__(self):
      super().__init__()
      self.img_encoder = Encoder(**cfg["img_encoder_cfg"])
      self.img_decoder = Decoder(**cfg["img_decoder_cfg"])
      self.quantize = VectorQuantize(**cfg["vq_cfg"])
      self.gs_embed = GaussianEmbed(**cfg["gs_embed_cfg"])
      self.render_set = RenderSet(img_H=cfg["fm_shape"][0], img_W=cfg["fm_shape"][1])

    def encode(self, x):
      gaussians = self.gs_embed(self.img_encoder(x))
      quantized, indices, commit = self.quantize(trainer, gaussians.features)
      gaussians.features = quantized
      return gaussians, indices, commit

    def forward(self, x):
      gaussians, _, commit = self.encode(x)
      return self.img_decoder(render_gaussians(gaussians, self.render_set)), commit

  torch.manual_seed(0)
  generator = Generator().train()
  loss = VQLPIPSWithDiscriminator(**{**cfg["loss_cfg"], "perceptual_weight": lpips_weight}).train()
  # timm's "adamw" is torch's AdamW; YAML reads 2e-4 as a string, hence float().
  adamw = lambda params, opt: torch.optim.AdamW(params, lr=float(opt["lr"]), betas=tuple(opt["betas"]),
                                                weight_decay=float(opt["weight_decay"]))
  return (generator, loss, adamw(generator.parameters(), cfg["optim_gen_cfg"]),
          adamw(loss.discriminator.parameters(), cfg["optim_disc_cfg"]), LitEma(generator))


def median_ms(fn, calls: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def time_step(reference_dir, lpips_weight, batch_size, steps):
  generator, loss, opt_gen, opt_disc, ema = build(reference_dir, lpips_weight)
  last_layer = generator.img_decoder.conv_out.weight
  x = torch.rand(batch_size, 3, 32, 32) * 2 - 1
  epoch = 5  # cifar-gqgan-1's gan_start_epoch: the generator's GAN term on

  def step():
    reconstruction, commit = generator(x)
    gen_loss, _ = loss(commit, x, reconstruction, 0, epoch, last_layer=last_layer)
    opt_gen.zero_grad()
    gen_loss.backward()
    opt_gen.step()
    disc_loss, _ = loss(commit, x, reconstruction, 1, epoch, last_layer=last_layer)
    opt_disc.zero_grad()
    disc_loss.backward()
    opt_disc.step()
    ema(generator)

  return median_ms(step, steps, warmup=2), generator


def part_rows(generator, batch_size, calls):
  """(name, forward ms, forward + backward ms) of the encoder, embedder and decoder."""
  from gstk.modules.gaussianembed.gaussian_render import render_gaussians
  x = torch.rand(batch_size, 3, 32, 32) * 2 - 1
  with torch.no_grad():
    feature_map = generator.img_encoder(x)
    gaussians, _, _ = generator.encode(x)
    splatted = render_gaussians(gaussians, generator.render_set)
  outputs = {"encoder": lambda out: out, "decoder": lambda out: out,
             "embedder": lambda g: torch.cat([g.means.flatten(1), g.scales.flatten(1), g.rotations.flatten(1),
                                              g.features.flatten(1)], 1)}
  rows = []
  for name, module, inputs in (("encoder", generator.img_encoder, x), ("embedder", generator.gs_embed, feature_map),
                               ("decoder", generator.img_decoder, splatted)):
    def forward(module=module, inputs=inputs):
      with torch.no_grad():
        module(inputs)

    def forward_backward(module=module, inputs=inputs, name=name):
      leaf = inputs.detach().clone().requires_grad_(True)
      module.zero_grad()
      outputs[name](module(leaf)).square().mean().backward()

    rows.append((name, median_ms(forward, calls), median_ms(forward_backward, calls)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference_dir", required=True, help="Checkout of ChrisDong-THU/GaussianToken.")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--encode_batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=12, help="Timed train steps per variant.")
  parser.add_argument("--rounds", type=int, default=7, help="Timed calls per encode and part row.")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
  parser.add_argument("--noparts", dest="parts", action="store_false")
  args = parser.parse_args()
  reference_dir = os.path.abspath(args.reference_dir)
  if not os.path.isfile(os.path.join(reference_dir, "configs", "cifar-gqgan-1.yaml")):
    raise SystemExit(f"--reference_dir: expected a GaussianToken checkout with configs/cifar-gqgan-1.yaml, got "
                     f"{reference_dir}")
  torch.set_num_threads(args.threads)
  install_cpu_stand_ins(reference_dir)
  os.chdir(reference_dir)  # LPIPS finds its linear heads (vgg.pth) relative to the working directory
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}", flush=True)

  step_ms, generator = time_step(reference_dir, 0.0, args.batch_size, args.steps)
  step_lpips_ms, _ = time_step(reference_dir, 1.0, args.batch_size, args.steps)
  generator(torch.rand(args.encode_batch_size, 3, 32, 32) * 2 - 1)  # one more training call, then eval mode
  generator.eval()
  images = torch.rand(args.encode_batch_size, 3, 32, 32) * 2 - 1

  def encode():
    with torch.no_grad():
      generator.encode(images)

  encode_ms = median_ms(encode, args.rounds)
  print(f"\n{'what':12s} {'batch':>5s} {'ms':>9s} {'img/s':>8s}")
  for name, batch, ms in (("step", args.batch_size, step_ms), ("step+lpips", args.batch_size, step_lpips_ms),
                          ("encode", args.encode_batch_size, encode_ms)):
    print(f"{name:12s} {batch:5d} {ms:9.1f} {1000 * batch / ms:8.2f}")
  print(f"LPIPS adds {step_lpips_ms / step_ms - 1:.0%} to the step")
  if args.parts:
    print(f"\n{'part':12s} {'fwd ms':>9s} {'f+b ms':>9s}")
    for name, fwd, both in part_rows(generator.train(), args.batch_size, args.rounds):
      print(f"{name:12s} {fwd:9.1f} {both:9.1f}")
  print(json.dumps({"step_ms": round(step_ms, 1), "step_lpips_ms": round(step_lpips_ms, 1),
                    "encode_ms": round(encode_ms, 1), "batch_size": args.batch_size,
                    "encode_batch_size": args.encode_batch_size, "threads": torch.get_num_threads(),
                    "torch": torch.__version__}))


if __name__ == "__main__":
  main()
