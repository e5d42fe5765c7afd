r"""Trivial answers for the demo's held-out crops: block means, continuous and with as many bits as the tokens.

The evaluation logs `eval_psnr_block_baseline`: each held-out crop replaced by the means of an 8 x 8 grid of
blocks, as many RGB values as a 64-token model has tokens. Those are 64 x 3 continuous numbers per image, while
an index into a 256-code codebook carries 8 bits. This prints the block-mean PSNR, and the same block means
snapped to a palette of `codes` colours (k-means on the block means of random training crops, the crops the
demo trains on), i.e. the trivial answer at the tokens' bit budget.

    python benchmarks/block_baselines.py [--num_images=64] [--train_crops=2048] [--codes=256,1024]

PSNR is the evaluation's: the mean over images of per-image PSNR on [0, 1].
"""
from __future__ import annotations

from absl import app, flags
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from gaussiantoken_jax.data import demo as demo_data
from gaussiantoken_jax.data import transforms
from gaussiantoken_jax.evaluation import image_metrics

_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Held-out demo crops (the evaluation's first N).")
_TRAIN_CROPS = flags.DEFINE_integer("train_crops", 2048, "Random training crops whose block means fit the palette.")
_CODES = flags.DEFINE_list("codes", ["256", "1024"], "Palette sizes.")
_CELLS = flags.DEFINE_integer("cells", 8, "Grid side: 8 x 8 block means for 64 tokens.")
_SIZE = 32  # configs/demo.py's image size


def _block_means(images: np.ndarray, cells: int) -> np.ndarray:
  """[N, S, S, 3] in [0, 1] -> [N, cells, cells, 3]: the evaluation's block means, one value per block."""
  block = images.shape[1] // cells
  return np.asarray(image_metrics.block_average(jnp.asarray(images, jnp.float32), cells))[:, ::block, ::block]


def _upsample(means: np.ndarray, size: int) -> np.ndarray:
  block = size // means.shape[1]
  return np.repeat(np.repeat(means, block, axis=1), block, axis=2)


def _psnr(images: np.ndarray, answer: np.ndarray) -> float:
  return float(jnp.mean(image_metrics.psnr(jnp.asarray(images, jnp.float32), jnp.asarray(answer, jnp.float32))))


def main(argv):
  del argv
  cells = _CELLS.value
  held_source = demo_data.DemoEvalSource(_SIZE)
  held = np.stack([held_source[i]["data"] for i in range(_NUM_IMAGES.value)]).astype(np.float64) / 255.0
  train_source = demo_data.DemoTrainSource()
  rng = np.random.default_rng(0)
  train = np.stack([transforms.random_scale_crop(train_source[i % len(train_source)]["data"], rng, _SIZE)
                    for i in range(_TRAIN_CROPS.value)]).astype(np.float64) / 255.0

  held_means = _block_means(held, cells)
  block_psnr = _psnr(held, _upsample(held_means, _SIZE))
  print(f"{len(held)} held-out crops, {cells}x{cells} blocks; palettes fitted on {len(train)} training crops\n")
  print(f"{'answer':40s} {'bits per block':>14s} {'PSNR dB':>8s}")
  print(f"{'block means (the logged baseline)':40s} {'3 floats':>14s} {block_psnr:8.2f}")
  train_colours = _block_means(train, cells).reshape(-1, 3)
  for codes in (int(c) for c in _CODES.value):
    palette = KMeans(codes, n_init=1, random_state=0).fit(train_colours)
    snapped = palette.cluster_centers_[palette.predict(held_means.reshape(-1, 3))].reshape(held_means.shape)
    psnr = _psnr(held, _upsample(snapped, _SIZE))
    print(f"{f'block means on a {codes}-colour palette':40s} {np.log2(codes):14.0f} {psnr:8.2f}")


if __name__ == "__main__":
  app.run(main)
