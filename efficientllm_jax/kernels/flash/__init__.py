"""Flash attention (Pallas): forward + backward, GQA-native, causal / windowed, in-kernel T5 / ALiBi biases."""

from efficientllm_jax.kernels.flash.kernel import flash_attention
from efficientllm_jax.kernels.flash.reference import reference_attention

__all__ = ["flash_attention", "reference_attention"]
