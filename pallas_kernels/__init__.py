"""Pallas GPU kernels. Importable on machines without a GPU."""
