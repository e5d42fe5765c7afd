"""Evaluation: the FID Inception network, FID / KID, PSNR, SSIM, pictures, and the evaluation pass.

See docs/evaluation.md. Commands: `python -m gaussiantoken_jax.evaluate` (a training checkpoint) and
`python -m gaussiantoken_jax.fid` (two image sets).
"""
from gaussiantoken_jax.evaluation.evaluator import MIN_FID_IMAGES, Evaluator

__all__ = ["Evaluator", "MIN_FID_IMAGES"]
