r"""GaussianToken on Mini-ImageNet at 256x256: 256 Gaussians on a 32x32 map, z = 8, codebook 1024.

Mini-ImageNet is read from an image folder (the 100-class ImageNet subset). The reference uses the Kaggle split
`jiajundong/mini-imagenet`; give its per-split file lists through `split_file`, where `{split}` is replaced by
`train_split` for training and `eval_split` for evaluation (lines `path`, `path label` or `path,label`).

  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py --workdir=/tmp/gt_mini \
      --config.data.path=/data/mini-imagenet/images --config.data.split_file=/data/mini-imagenet/{split}.csv
  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py:baseline=vq --workdir=/tmp/vq_mini ...
  python -m gaussiantoken_jax.main --config=configs/mini_imagenet.py:runlocal --workdir=/tmp/gt_mini_local ...
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.update(dict(source="folder", path="", split_file="", train_split="train", eval_split="val",
                     image_size=256, augment="random_resized_crop"))
  # Encoder 128@256 -> 256@128 -> 256@64 -> 512@32, out 32x32x64; decoder mirrors it.
  c.model.update(dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), num_gaussians=256,
                      feature_dim=8))
  c.batch_size = 24  # 4 per GPU x 6 GPUs
  steps_per_epoch = 50_000 // 24  # ~50k training images in the usual 100-class split
  c.total_steps = 30 * steps_per_epoch
  c.optimizer.warmup_steps = c.disc_optimizer.warmup_steps = steps_per_epoch
  c.loss.gan_start_step = 5 * steps_per_epoch
  c.checkpoint_every_steps = c.eval_every_steps = 5_000
  c.num_eval_images = 5_000
  return config_lib.finalize(c, arg)
