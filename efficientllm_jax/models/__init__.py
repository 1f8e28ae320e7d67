"""Model code: decoder, layers, attention variants, positions, MoE."""

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
