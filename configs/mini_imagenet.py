r"""GaussianToken on Mini-ImageNet at 256x256: 256 Gaussians on a 32x32 map, z = 8, codebook 1024.

Mini-ImageNet is read from an image folder (the 100-class ImageNet subset). The reference uses the Kaggle split
`jiajundong/mini-imagenet`; give its per-split file lists through `split_file`, where `{split}` is replaced by
`train_split` for training and `eval_split` for evaluation (lines `path`, `path label` or `path,label`).

  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py --workdir=/tmp/gt_mini \
      --config.data.path=/data/mini-imagenet/images --config.data.split_file=/data/mini-imagenet/{split}.csv
  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py:baseline=vq --workdir=/tmp/vq_mini ...
  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py:paper --workdir=/tmp/gt_mini_paper ...
  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py:runlocal --workdir=/tmp/gt_mini_local ...
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, baseline="", paper=False)
  c = config_lib.base_config()
  c.data.update(dict(source="folder", path="", split_file="", train_split="train", eval_split="val",
                     image_size=256, augment="random_resized_crop"))
  # Encoder 128@256 -> 256@128 -> 256@64 -> 512@32, out 32x32x64; decoder mirrors it.
  c.model.update(dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), num_gaussians=256,
                      feature_dim=8))
  # GroupNorm + swish recomputed in the backward pass. At batch 4 with LPIPS (the paper's per-GPU batch, on 24 GB
  # RTX 3090s) the step's buffers come to 16.9 GiB instead of 20.7 (15.7 instead of 21.0 with bfloat16
  # convolutions), as XLA:CPU assigns them (docs/benchmarks.md).
  c.model.remat_norms = True
  c.batch_size = 24  # 4 per GPU x 6 GPUs
  # 30 epochs, a 1-epoch warm-up and the GAN from epoch 5 (config_lib's defaults), in epochs of the files the
  # training split lists (~50,000 in the usual 100-class split): at batch 24 about 62,500 steps.
  c.checkpoint_every_steps = c.eval_every_steps = 5_000
  c.num_eval_images = 5_000

  if arg.baseline == "vq":
    # The paper's plain VQ: no Gaussians; one more downsampling level gives a 16x16 grid of codes, as many as K = 256.
    c.model.update(dict(type="vq", encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)))
  if arg.paper:
    # The paper's schedule (Sec. 4.1, Table 1) where the code differs: Adam (code: AdamW), lr 1e-4 (code: 2e-4),
    # betas (0.5, 0.9) (code: (0.9, 0.999)), weight decay 0 (code: 0.01). Epochs: 30 in paper and code alike
    # (the paper's 20 epochs are ImageNet's only).
    config_lib.paper_optimization(c, epochs=30.0)
  if arg.runlocal:
    # A CPU smoke run: 20 steps of 8 images of 32x32, warm-up and GAN from step 5, toy widths.
    config_lib.runlocal(c)  # ch 16, K = 16, 64 codes, D ndf 8; logs every 5 steps, evaluates every 10
    c.data.image_size = 32
  return c
