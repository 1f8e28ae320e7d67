"""Training: optimizer, loss, train/eval steps, loop."""

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
