"""Pallas kernels, one package per kernel: kernel.py (Pallas), reference.py (pure jnp), __init__ exports."""
