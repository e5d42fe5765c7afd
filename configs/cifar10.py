r"""GaussianToken on CIFAR-10 at 32x32: 64 Gaussians on a 16x16 map, z = 3, codebook 1024.

NOT the paper's dataset: the paper's CIFAR numbers (Table 1) are CIFAR-100, whose recipe is
`configs/cifar100.py` (the reference's data module subclasses CIFAR-100, cifar-gqgan-1.yaml). This file runs the
same recipe on the `cifar10` TFDS dataset, prepared once with TensorFlow installed (`pip install -e ".[tf]"`):
`tfds build cifar10 --file_format=array_record` (reading it afterwards needs no TensorFlow).

  python -m gaussiantoken_jax.main --config=configs/cifar10.py --workdir=/tmp/gt_cifar10
  python -m gaussiantoken_jax.main --config=configs/cifar10.py:baseline=vq --workdir=/tmp/vq_cifar10
  python -m gaussiantoken_jax.main --config=configs/cifar10.py:paper --workdir=/tmp/gt_cifar10_paper
  python -m gaussiantoken_jax.main --config=configs/cifar10.py:runlocal --workdir=/tmp/gt_cifar10_local
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, baseline="", paper=False)
  c = config_lib.cifar_config("cifar10")  # the reference CIFAR recipe (config_lib.cifar_config)

  if arg.baseline == "vq":
    # The paper's VQGAN row: 8x8 codes of z = 4 (GaussianToken keeps z = 3), the same encoder/decoder widths.
    c.model.update(config_lib.CIFAR_VQ_MODEL)
  if arg.paper:
    # Paper (Sec. 4.1): Adam, lr 1e-4, betas (0.5, 0.9), no weight decay, 30 epochs. Code (the default):
    # AdamW, lr 2e-4, betas (0.9, 0.999), weight decay 0.01, 30 epochs.
    config_lib.paper_optimization(c, epochs=30.0)
  if arg.runlocal:
    config_lib.runlocal(c)  # 20 steps of 8 images from step-5 warm-up/GAN; ch 16, K = 16, 64 codes, D ndf 8
  return c
