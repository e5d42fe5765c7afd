"""GaussianToken image tokenizer in JAX/Flax."""
from gaussiantoken_jax.splatting import splat

__all__ = ["splat"]
