"""Softmax cross-entropy rows (log-sum-exp, target logit, dlogits) in one Pallas kernel; train.loss_impl=pallas."""

from efficientllm_jax.kernels.xent.kernel import reference, softmax_xent

__all__ = ["reference", "softmax_xent"]
