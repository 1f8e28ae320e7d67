"""Pallas kernels, one package per kernel: kernel.py (Pallas), reference.py (pure jnp, what its tests compare
against), __init__ exports."""

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
