"""Pallas kernels, each beside a pure-jnp reference (reference.py) that its tests compare against."""
