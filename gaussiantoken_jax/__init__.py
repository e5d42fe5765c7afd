"""GaussianToken image tokenizer in JAX/Flax."""
from gaussiantoken_jax.splatting import splat

__all__ = ["splat", "GaussianTokenizer", "Tokens"]

# Imported on first use: the tokenizer pulls in the model, the train state and Orbax.
_LAZY = {"GaussianTokenizer": "gaussiantoken_jax.tokenizer", "Tokens": "gaussiantoken_jax.tokenizer"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
