"""Triton kernels of axpo (installed as the package ``axpo.kernels``)."""
