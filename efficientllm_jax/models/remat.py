"""Rematerialisation policies for the blocks (`model.remat`) and the names that let a policy keep kernel outputs.

`dots` keeps the outputs of dot_general (XLA's matmuls) and recomputes the rest in the backward pass. The
attention kernels (cuDNN, our Pallas flash kernel, NSA's sparse kernels) and the grouped matmuls of the MoE
(ragged_dot, our Pallas gmm) are not dot_generals, so under `dots` the backward runs their forward again: on an
H200 the cuDNN forward took 58.7 ms of a 0.5B step under `dots` against 27.9 ms without remat
(benchmarks/RESULTS.md). `dots_kernels`
also keeps what their backward passes need: the output and residuals of the attention kernel (tagged by
`keep_residuals`, since the residuals live inside the kernel's own custom VJP where no policy sees them) and the
grouped matmuls' outputs (tagged with `checkpoint_name`). The output matters as much as the residuals: the output
projection's weight gradient needs it, and without its name (the first version, measured on an H200) the cuDNN
forward still ran twice.
`dots_attention` keeps the attention kernel's but not the grouped matmuls' (the default: an MoE layer's saved
gate/up output is 2 * top_k * expert_dim values per token, +31 GB at MoE 0.5Bx8 with micro-batch 4 x 8K, past an
80 GB card). Measured on an H200 (benchmarks/RESULTS.md): dots_attention makes the dense 0.5B step 7 % and the
1.5B step 5 % faster than `dots`; dots_kernels makes the MoE 0.5Bx8 step 9 % faster than dots_attention.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

ATTENTION_RESIDUALS = "attention_residuals"
GROUPED_MATMUL = "grouped_matmul"

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS)),
    "dots_kernels": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS, GROUPED_MATMUL)),
}


def keep_residuals(fn, name: str = ATTENTION_RESIDUALS):
  """`fn(*arrays)` with the same values and gradients, whose backward residuals carry `checkpoint_name(name)`,
  so a remat policy that saves `name` keeps them instead of running `fn` again in the backward pass. Without
  such a policy the names do nothing."""

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    out, vjp_fn = jax.vjp(fn, *args)
    # The output is named too: the layer after the kernel (the output projection) needs it for its own weight
    # gradient, so without the name the backward would run the kernel again just to get it back.
    return jax.tree.map(lambda o: checkpoint_name(o, name), out), jax.tree.map(
        lambda r: checkpoint_name(r, name), vjp_fn)

  def bwd(vjp_fn, g):
    return vjp_fn(g)

  wrapped.defvjp(fwd, bwd)
  return wrapped
