r"""A small GaussianToken that trains on CPU in under five minutes on the embedded demo photographs.

The data are random crops of the real photographs bundled with scikit-image and scikit-learn (no download);
a fixed set of held-out photos is used for evaluation. `:runlocal` is the tiny variant the tests use.

  python -m gaussiantoken_jax.main --config=configs/demo.py --workdir=/tmp/gt_demo
  python -m gaussiantoken_jax.main --config=configs/demo.py:runlocal --workdir=/tmp/gt_demo_local
  python -m gaussiantoken_jax.main --config=configs/demo.py:baseline=vq --workdir=/tmp/vq_demo
"""
from gaussiantoken_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, baseline="")
  c = config_lib.base_config()
  c.data.update(dict(source="demo", image_size=32, augment="none"))
  # The CIFAR architecture at a quarter of the width with one res block per level, and a one-block Gaussian
  # embedder (one deformable cross-attention layer, no self-attention encoder over the image tokens) without
  # dropout. Each block or encoder layer costs ~34 ms of the step's forward + backward at batch 16 on 2 cores
  # (the embedder: 42 ms with one block and none, 108 with two and one, 198 with the reference's three and two),
  # and at 600 steps the one-block embedder scored as the two-block one did (docs/training.md); the time saved
  # buys steps.
  c.model.update(dict(ch=32, num_res_blocks=1, num_groups=16, num_gaussians=64, feature_dim=3,
                      codebook_size=256))
  c.model.embedder.update(dict(num_blocks=1, num_encoder_layers=0, num_decoder_layers=1, dropout=0.0))
  c.discriminator.ndf = 16
  # LPIPS-VGG16 on 32-pixel crops costs 17 GFLOP forward per batch, as much as this tokenizer's whole step, and
  # makes the step 2.5x as long (467 against 187 ms at batch 16, benchmarks/train_step_bench.py, 2026-12-04), so
  # the demo trains with L1 + commitment and reports LPIPS only in evaluation.
  c.loss.lpips_weight = 0.0
  c.batch_size = 16
  # Stated in steps, not epochs: the demo's "epoch" is artificial (9 photos x 64 records, each a fresh random
  # crop, a unit of shuffling only). 850 steps of 16 crops are 23.6 such epochs, about 3.5 minutes on 2 cores.
  c.total_epochs = c.optimizer.warmup_epochs = c.disc_optimizer.warmup_epochs = c.loss.gan_start_epochs = None
  c.total_steps = 850
  c.log_every_steps = 50
  c.checkpoint_every_steps = 425
  c.eval_every_steps = 850
  c.num_eval_images = 64
  for opt in (c.optimizer, c.disc_optimizer):
    opt.update(dict(learning_rate=1e-3, warmup_steps=50))
  # The discriminator trains, but its loss never reaches the generator: at this scale it cost both PSNR and
  # LPIPS (1800 steps with the GAN from step 1200: 29.13 dB / LPIPS 0.268 at 1200, 28.01 / 0.306 at 1800;
  # docs/training.md). `--config.loss.gan_start_step=300` switches it on; a longer `--config.total_steps` without
  # it starts the GAN at step 1200.
  c.loss.gan_start_step = 1200
  # 0.999 (the reference) averages over ~1000 steps: after 850 steps 43% of the EMA would still be the init.
  c.ema_decay = 0.99
  # The last evaluation also fits each held-out image's geometry to it (25 steps, 11 s on 2 CPU cores): +2.2 dB
  # (docs/training.md).
  c.eval_fit_geometry_steps = 25
  c.profile_steps = 0  # a CPU profile of 5 steps takes seconds to write (writers.Profiler); the demo has five minutes

  if arg.baseline == "vq":
    # The paper's plain VQ: no Gaussians; one more downsampling level gives an 8x8 grid of codes, as many as K = 64.
    c.model.update(dict(type="vq", encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2)))
    c.eval_fit_geometry_steps = 0  # its tokens have no geometry
  if arg.runlocal:
    # The tests' training runs: 20 steps of 8 crops, warm-up and GAN from step 5, toy widths (learning rate 1e-3
    # and EMA 0.99 as above), with the embedder's dropout the train-step tests exercise.
    config_lib.runlocal(c)  # ch 16, K = 16, 64 codes, D ndf 8; logs every 5 steps, evaluates every 10
    c.model.embedder.dropout = 0.1
    c.eval_fit_geometry_steps = 0  # the fit compiles for tens of seconds; the tests switch it on where they check it
  return c
