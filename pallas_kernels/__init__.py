"""Pallas kernels (GPU through the Triton lowering, TPU through Mosaic). Importable on machines without either.

A leaf package: it never imports gaussiantoken_jax, which imports it.
"""
