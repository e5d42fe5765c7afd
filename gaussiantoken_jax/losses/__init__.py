"""Training losses: L1, LPIPS-VGG16 with the official weights, GAN terms (non-saturating, hinge, LeCAM)."""
from gaussiantoken_jax.losses.lpips import LPIPS, load_lpips_params, lpips_distance
from gaussiantoken_jax.losses.terms import (adaptive_gan_weight, discriminator_hinge_loss, generator_gan_loss,
                                            l1_loss, lecam_loss, update_lecam_ema)

__all__ = [
    "LPIPS",
    "adaptive_gan_weight",
    "discriminator_hinge_loss",
    "generator_gan_loss",
    "l1_loss",
    "lecam_loss",
    "load_lpips_params",
    "lpips_distance",
    "update_lecam_ema",
]
