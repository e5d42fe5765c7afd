r"""GaussianToken on ImageNet-1k at 256x256: 256 Gaussians on a 32x32 map, z = 8, codebook 1024.

Data: the `imagenet2012` TFDS dataset, which needs the user's own ImageNet tars in TFDS's manual dir
(README, "Data"). The paper's text says codebook 2048, its table and the code 1024: 1024 here.

  python -m gaussiantoken_jax.main --config=configs/imagenet.py --workdir=/tmp/gt_imagenet
  python -m gaussiantoken_jax.main --config=configs/imagenet.py:baseline=vq --workdir=/tmp/vq_imagenet
  python -m gaussiantoken_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/gt_imagenet_local
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.update(dict(source="tfds", name="imagenet2012", train_split="train", eval_split="validation",
                     image_size=256, augment="random_resized_crop"))
  c.model.update(dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), num_gaussians=256,
                      feature_dim=8))
  # Code: Adam (no decay) 2e-4, betas (0.5, 0.9) for ImageNet; paper: Adam 1e-4, betas (0.5, 0.9).
  for opt in (c.optimizer, c.disc_optimizer):
    opt.update(dict(name="adam", b1=0.5, b2=0.9, weight_decay=0.0))
  c.batch_size = 24  # 4 per GPU x 6 GPUs
  steps_per_epoch = 1_281_167 // 24
  c.total_steps = 30 * steps_per_epoch
  for opt in (c.optimizer, c.disc_optimizer):
    opt.warmup_steps = steps_per_epoch
  c.loss.gan_start_step = 5 * steps_per_epoch
  c.log_every_steps = 100
  c.checkpoint_every_steps = c.eval_every_steps = 10_000
  c.num_eval_images = 10_000
  return config_lib.finalize(c, arg)
