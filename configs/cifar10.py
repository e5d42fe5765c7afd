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
  c = config_lib.base_config()
  # Everything is the reference CIFAR setting (see config_lib.base_config): encoder ch 128, ch_mult (1, 2),
  # 4 res blocks -> 16x16x64; K = 64; z = 3; EMA VQ 1024 codes; AdamW 2e-4; global batch 384; 30 epochs.
  c.data.update(dict(source="tfds", name="cifar10", train_split="train", eval_split="test", image_size=32))
  return config_lib.finalize(c, arg)
