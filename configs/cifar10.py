r"""GaussianToken on CIFAR-10 at 32x32: 64 Gaussians on a 16x16 map, z = 3, codebook 1024.

The reference trains its CIFAR config on CIFAR-100 (cifar-gqgan-1.yaml); sizes and optimisation are the same
here, on the `cifar10` TFDS dataset, prepared once with TensorFlow installed (`pip install -e ".[tf]"`):
`tfds build cifar10 --file_format=array_record` (reading it afterwards needs no TensorFlow).

  python -m gaussiantoken_jax.main --config=configs/cifar10.py --workdir=/tmp/gt_cifar10
  python -m gaussiantoken_jax.main --config=configs/cifar10.py:baseline=vq --workdir=/tmp/vq_cifar10
  python -m gaussiantoken_jax.main --config=configs/cifar10.py:runlocal --workdir=/tmp/gt_cifar10_local
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, baseline="")
  c = config_lib.base_config()
  # Everything is the reference CIFAR setting (see config_lib.base_config): encoder ch 128, ch_mult (1, 2),
  # 4 res blocks -> 16x16x64; K = 64; z = 3; EMA VQ 1024 codes; AdamW 2e-4; global batch 384; 30 epochs with a
  # 1-epoch warm-up and the GAN from epoch 5, in epochs of the 50,000 training images whatever the batch
  # (`--config.batch_size=64`: 23,438 steps, logged at start-up).
  c.data.update(dict(source="tfds", name="cifar10", train_split="train", eval_split="test", image_size=32))

  if arg.baseline == "vq":
    # The paper's plain VQ: no Gaussians; one more downsampling level gives an 8x8 grid of codes, as many as K = 64.
    c.model.update(dict(type="vq", encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2)))
  if arg.runlocal:
    # A CPU smoke run, counted in steps: 20 steps of 8 images, warm-up and GAN from step 5, toy widths.
    c.update(dict(total_steps=20, batch_size=8))
    c.optimizer.warmup_steps = c.disc_optimizer.warmup_steps = c.loss.gan_start_step = 5
    config_lib.shrink_for_cpu(c)  # ch 16, K = 16, 64 codes, D ndf 8; logs every 5 steps, evaluates every 10
  return c
