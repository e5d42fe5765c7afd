r"""GaussianToken on ImageNet-1k at 256x256: 256 Gaussians on a 32x32 map, z = 8, codebook 1024.

Data: the `imagenet2012` TFDS dataset, which needs the user's own ImageNet tars in TFDS's manual dir
(README, "Data"). The paper's text says codebook 2048, its table and the code 1024: 1024 here.

  python -m gaussiantoken_jax.main --config=configs/imagenet.py --workdir=/tmp/gt_imagenet
  python -m gaussiantoken_jax.main --config=configs/imagenet.py:baseline=vq --workdir=/tmp/vq_imagenet
  python -m gaussiantoken_jax.main --config=configs/imagenet.py:paper --workdir=/tmp/gt_imagenet_paper
  python -m gaussiantoken_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/gt_imagenet_local
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, baseline="", paper=False)
  c = config_lib.base_config()
  c.data.update(dict(source="tfds", name="imagenet2012", train_split="train", eval_split="validation",
                     image_size=256, augment="random_resized_crop"))
  c.model.update(dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), num_gaussians=256,
                      feature_dim=8))
  # GroupNorm + swish recomputed in the backward pass. At batch 4 with LPIPS (the paper's per-GPU batch, on 24 GB
  # RTX 3090s) the step's buffers come to 16.9 GiB instead of 20.7 (15.7 instead of 21.0 with bfloat16
  # convolutions), as XLA:CPU assigns them (docs/benchmarks.md).
  c.model.remat_norms = True
  # Code: Adam (no decay) 2e-4, betas (0.5, 0.9) for ImageNet; paper: Adam 1e-4, betas (0.5, 0.9).
  for opt in (c.optimizer, c.disc_optimizer):
    opt.update(dict(name="adam", b1=0.5, b2=0.9, weight_decay=0.0))
  c.batch_size = 24  # 4 per GPU x 6 GPUs
  # 30 epochs of the 1,281,167 training images, a 1-epoch warm-up and the GAN from epoch 5 (config_lib's
  # defaults); at batch 24: 1,601,459 steps, warm-up 53,382, GAN from step 266,910.
  c.log_every_steps = 100
  c.checkpoint_every_steps = c.eval_every_steps = 10_000
  c.num_eval_images = 10_000

  if arg.baseline == "vq":
    # The paper's plain VQ: no Gaussians; one more downsampling level gives a 16x16 grid of codes, as many as K = 256.
    c.model.update(dict(type="vq", encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)))
  if arg.paper:
    # The paper's Table 1 schedule for ImageNet where the code differs: 20 epochs (code: 30) at lr 1e-4 (code:
    # 2e-4). Optimizer type (Adam), betas (0.5, 0.9) and weight decay (0) are the same in paper and code here.
    config_lib.paper_optimization(c, epochs=20.0)
  if arg.runlocal:
    # A CPU smoke run: 20 steps of 8 images of 32x32, warm-up and GAN from step 5, toy widths.
    config_lib.runlocal(c)  # ch 16, K = 16, 64 codes, D ndf 8; logs every 5 steps, evaluates every 10
    c.data.image_size = 32
  return c
