"""Flax modules of the tokenizer, and `build_model` / `build_discriminator` from a config."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from gaussiantoken_jax.models.autoencoder import GaussianToken, ModelOutput, VQBaseline
from gaussiantoken_jax.models.discriminator import PatchDiscriminator
from gaussiantoken_jax.models.encoder_decoder import Decoder, Encoder
from gaussiantoken_jax.models.gaussian_embedder import GaussianEmbedder, Gaussians
from gaussiantoken_jax.models.quantizer import QuantizerOutput, VectorQuantizer

MODEL_TYPES = ("gaussiantoken", "vq")


def feature_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(h, w) of the encoder's output map: one stride-2 downsample per level after the first."""
  size = config.data.image_size
  factor = 2 ** (len(config.model.encoder_ch_mult) - 1)
  if size % factor:
    raise ValueError(f"config.data.image_size must be divisible by {factor} (the encoder's total stride for "
                     f"encoder_ch_mult={tuple(config.model.encoder_ch_mult)}), got {size}.")
  return size // factor, size // factor


def build_model(config: ml_collections.ConfigDict):
  """The generator (GaussianToken or the VQ baseline, by `config.model.type`) as an unbound Flax module."""
  m = config.model
  if m.type not in MODEL_TYPES:
    raise ValueError(f"config.model.type must be one of {MODEL_TYPES}, got {m.type!r}.")
  dtype = jnp.dtype(m.conv_dtype)
  remat_norms = m.get("remat_norms", False)  # absent from the configs saved with older checkpoints
  is_vq = m.type == "vq"
  encoder = Encoder(ch=m.ch, ch_mult=tuple(m.encoder_ch_mult), num_res_blocks=m.num_res_blocks,
                    out_channels=m.feature_dim if is_vq else m.embed_dim, num_groups=m.num_groups, dtype=dtype,
                    remat_norms=remat_norms)
  decoder = Decoder(ch=m.ch, ch_mult=tuple(m.decoder_ch_mult), num_res_blocks=m.num_res_blocks, out_channels=3,
                    z_channels=m.feature_dim, num_groups=m.num_groups, dtype=dtype, remat_norms=remat_norms)
  quantizer = VectorQuantizer(codebook_size=m.codebook_size, dim=m.feature_dim, **m.quantizer.to_dict())
  common = dict(image_size=config.data.image_size, feature_shape=feature_shape(config))
  if is_vq:
    return VQBaseline(encoder=encoder, quantizer=quantizer, decoder=decoder, **common)
  embedder = GaussianEmbedder(num_gaussians=m.num_gaussians, feature_dim=m.feature_dim, embed_dim=m.embed_dim,
                              **m.embedder.to_dict())
  return GaussianToken(encoder=encoder, embedder=embedder, quantizer=quantizer, decoder=decoder,
                       splat_impl=m.splat_impl, splat_cutoff=m.splat_cutoff, **common)


def build_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
  return PatchDiscriminator(ndf=config.discriminator.ndf, n_layers=config.discriminator.n_layers)


__all__ = ["GaussianToken", "VQBaseline", "ModelOutput", "Gaussians", "QuantizerOutput", "Encoder", "Decoder",
           "GaussianEmbedder", "VectorQuantizer", "PatchDiscriminator", "build_model", "build_discriminator",
           "feature_shape"]
