"""Input pipelines: grain over TFDS data sources, image folders and the embedded demo photographs.

See docs/data.md. `python -m gaussiantoken_jax.data.inspect` shows what the pipeline feeds the model.
"""
from gaussiantoken_jax.data.device import to_global_array
from gaussiantoken_jax.data.pipeline import (checkpoint_args, make_eval_loader, make_source, make_train_loader,
                                             restore_args, train_split_size)
from gaussiantoken_jax.pixels import to_model_input

__all__ = ["checkpoint_args", "make_eval_loader", "make_source", "make_train_loader", "restore_args",
           "to_global_array", "to_model_input", "train_split_size"]
