"""efficientllm_jax: EfficientLLM architecture-pretraining benchmark for Qwen2.5-style models in JAX/Flax NNX."""

import sys

# The JAX / Flax settings (jax_setup.py) come with the first module that uses JAX, so the command lines and the
# config files import this package without loading JAX. A caller that already holds JAX gets them here, at once.
if "jax" in sys.modules:
  from efficientllm_jax import jax_setup  # noqa: F401

__version__ = "0.1.0"
