"""efficientllm_jax: EfficientLLM architecture-pretraining benchmark for Qwen2.5-style models in JAX/Flax NNX."""

import flax

# Parameters carry *logical* axis names (vocab, embed, heads, ...) that parallel/ maps to mesh axes through the
# config's rules table; Flax's eager sharding would read them as mesh axes, so it stays off.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
