"""Pallas kernels, one package per kernel: kernel.py (Pallas), reference.py (pure jnp, what its tests compare
against), __init__ exports."""
