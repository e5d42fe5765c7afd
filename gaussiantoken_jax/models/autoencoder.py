"""The whole tokenizer: GaussianToken (encode -> embed -> quantize -> splat -> decode) and the plain-VQ baseline.

Both are Flax modules whose submodules are passed in as fields, so the parameter tree has exactly the top-level
entries "encoder", ("embedder"), "decoder", and the codebook state lives in the "codebook" collection. Build
them from a config with `build_model`.

Both decode tokens through one interface, `decode_indices(indices, means=None, rotations=None, scales=None)`
(the baseline's tokens have no geometry), and `encode_tokens(images)` gives (indices, Gaussians or None).

Variable collections:
  params           trainable weights;
  codebook         EMA codebook statistics (updated when `train=True` and the collection is mutable);
  range_scheduler  the embedder's annealed maximum Gaussian scale (GaussianToken only).
RNG streams used when `train=True`: "dropout" (embedder) and "quantizer" (k-means init, dead-code reset).
"""
from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gaussiantoken_jax import splatting
from gaussiantoken_jax.models.gaussian_embedder import Gaussians


@flax.struct.dataclass
class ModelOutput:
  """What one forward pass returns.

  `indices` are the discrete tokens: [B, K] (one per Gaussian) for GaussianToken, [B, h*w] for the baseline.
  `gaussians` holds the continuous geometry and the QUANTIZED features (None for the baseline).
  """
  reconstruction: jax.Array
  indices: jax.Array
  gaussians: Optional[Gaussians]
  commitment_loss: jax.Array
  perplexity: jax.Array
  usage: jax.Array


def check_images(images, image_size: int, where: str) -> None:
  if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
    raise ValueError(f"{where}: `images` must have shape [B, {image_size}, {image_size}, 3] (NHWC, the trained "
                     f"image size), got shape {tuple(images.shape)}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{where}: `images` must be floating point in [-1, 1], got dtype {images.dtype}.")


def _shape_of(x) -> str:
  return "None" if x is None else str(tuple(getattr(x, "shape", ())))


class GaussianToken(nn.Module):
  """Image -> K featured 2D Gaussians with quantized features -> image."""
  encoder: nn.Module
  embedder: nn.Module
  quantizer: nn.Module
  decoder: nn.Module
  image_size: int
  feature_shape: tuple[int, int]  # (h, w) of the encoder's map, which is also the splat target
  splat_impl: str = "auto"
  splat_cutoff: float = 1.0 / 255.0

  def encode(self, images, *, train: bool):
    """images [B,H,W,3] in [-1,1] -> (Gaussians with quantized features, QuantizerOutput)."""
    check_images(images, self.image_size, "GaussianToken.encode")
    gaussians = self.embedder(self.encoder(images), train=train)
    quantized, vq = self.quantizer(gaussians.features, train=train)
    return gaussians.replace(features=quantized), vq

  def decode(self, gaussians: Gaussians):
    """Gaussians (with quantized features) -> reconstruction [B,H,W,3]."""
    h, w = self.feature_shape
    feature_map = splatting.splat(gaussians.means, gaussians.rotations, gaussians.scales, gaussians.features,
                                  height=h, width=w, cutoff=self.splat_cutoff, impl=self.splat_impl)
    return self.decoder(feature_map)

  def encode_tokens(self, images):
    """images [B,H,W,3] in [-1,1] -> (indices int32 [B,K], Gaussians whose features are the quantized codes),
    in eval mode; the tokens that `decode_indices` takes."""
    gaussians, vq = self.encode(images, train=False)
    return vq.indices, gaussians

  def decode_indices(self, indices, means=None, rotations=None, scales=None):
    """Tokens (codebook indices [B,K] plus the Gaussians' continuous geometry) -> reconstruction [B,H,W,3].

    The same signature as `VQBaseline.decode_indices`, whose tokens have no geometry."""
    if means is None or rotations is None or scales is None:
      raise ValueError("GaussianToken.decode_indices: tokens need `means`, `rotations` and `scales` besides "
                       f"`indices`, got means={_shape_of(means)}, rotations={_shape_of(rotations)}, "
                       f"scales={_shape_of(scales)}.")
    features = self.quantizer.lookup(indices)
    return self.decode(Gaussians(means=means, rotations=rotations, scales=scales, features=features))

  def __call__(self, images, *, train: bool) -> ModelOutput:
    gaussians, vq = self.encode(images, train=train)
    return ModelOutput(reconstruction=self.decode(gaussians), indices=vq.indices, gaussians=gaussians,
                       commitment_loss=vq.commitment_loss, perplexity=vq.perplexity, usage=vq.usage)


class VQBaseline(nn.Module):
  """The plain-VQ baseline: the encoder's [h, w, z] grid is quantized cell by cell and decoded."""
  encoder: nn.Module
  quantizer: nn.Module
  decoder: nn.Module
  image_size: int
  feature_shape: tuple[int, int]

  def encode(self, images, *, train: bool):
    """images -> (quantized grid [B,h,w,z], QuantizerOutput with indices [B, h*w])."""
    check_images(images, self.image_size, "VQBaseline.encode")
    quantized, vq = self.quantizer(self.encoder(images), train=train)
    return quantized, vq.replace(indices=vq.indices.reshape(vq.indices.shape[0], -1))

  def encode_tokens(self, images):
    """images -> (indices int32 [B, h*w], None): the baseline's tokens carry no geometry (eval mode)."""
    _, vq = self.encode(images, train=False)
    return vq.indices, None

  def decode_indices(self, indices, means=None, rotations=None, scales=None):
    """Tokens (indices [B, h*w], row-major over the code grid) -> reconstruction [B,H,W,3].

    The same signature as `GaussianToken.decode_indices`; the geometry must be None (the baseline has none)."""
    if means is not None or rotations is not None or scales is not None:
      raise ValueError("VQBaseline.decode_indices: the plain-VQ baseline's tokens are indices only; got "
                       f"means={_shape_of(means)}, rotations={_shape_of(rotations)}, scales={_shape_of(scales)}.")
    h, w = self.feature_shape
    return self.decoder(self.quantizer.lookup(indices.reshape(indices.shape[0], h, w)))

  def __call__(self, images, *, train: bool) -> ModelOutput:
    quantized, vq = self.encode(images, train=train)
    return ModelOutput(reconstruction=self.decoder(quantized), indices=vq.indices, gaussians=None,
                       commitment_loss=vq.commitment_loss, perplexity=vq.perplexity, usage=vq.usage)
