"""NSA kernels (Pallas, forward + backward): the compressed branch, its selection scores, the selected branch."""

from efficientllm_jax.kernels.nsa.kernel import (Blocks, compressed_attention, select_top, selected_attention,
                                                 selection_scores)

__all__ = ["Blocks", "compressed_attention", "select_top", "selected_attention", "selection_scores"]
