"""Grouped matmul (dropless MoE experts): Pallas kernels with a custom VJP, and the per-group jnp reference."""

from efficientllm_jax.kernels.gmm.kernel import (GmmConfig, Tiling, gmm, grouped_matmul,
                                                 transposed_grouped_matmul, visit_schedule)

__all__ = ["GmmConfig", "Tiling", "gmm", "grouped_matmul", "transposed_grouped_matmul", "visit_schedule"]
