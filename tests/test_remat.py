"""models/remat.py: `dots_kernels` keeps attention-kernel residuals and grouped-matmul outputs, values unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import ops


def _kernel(x):  # stands in for an attention kernel: a custom VJP whose residual (cos x) is internal to it
  return jnp.sin(x) * 2.0


def _block(x, w):
  h = remat.keep_residuals(_kernel)(x @ w)
  return jnp.tanh(h @ w)


def _remat_body_and_outer(policy, x, w):
  """The backward's rematerialised body (the remat2 sub-jaxpr) and the rest, as text."""
  f = jax.checkpoint(_block, policy=policy)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1)))(x, w)
  bodies = [str(e.params["jaxpr"]) for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]
  assert len(bodies) == 1
  return bodies[0], str(jaxpr).replace(bodies[0], "")


def test_dots_kernels_keeps_kernel_residuals_that_dots_recomputes():
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 4), (4, 4)))
  body, _ = _remat_body_and_outer(remat.POLICIES["dots"], x, w)
  assert " cos " in body  # dots: the kernel's forward (its residual) runs again in the backward
  body, outer = _remat_body_and_outer(remat.POLICIES["dots_kernels"], x, w)
  assert " cos " not in body and " cos " in outer  # dots_kernels: computed once, in the forward, and saved
  assert " sin " not in body  # nor is its output recomputed for the next matmul's weight gradient
  grads = [jax.grad(lambda x, w: jax.checkpoint(_block, policy=p)(x, w).sum(), argnums=(0, 1))(x, w)
           for p in (remat.POLICIES["dots"], remat.POLICIES["dots_kernels"])]
  plain = jax.grad(lambda x, w: jnp.tanh((jnp.sin(x @ w) * 2.0) @ w).sum(), argnums=(0, 1))(x, w)
  for g in grads:
    for a, b in zip(g, plain):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_pallas_attention_is_wrapped_and_exact_under_dots_kernels():
  """The flash kernel (interpret mode) behind keep_residuals: same output and gradients as the xla path, inside a
  dots_kernels checkpoint."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 40, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 16)), jnp.float32) for _ in range(2))
  blocks = ops.PallasBlocks(block_q=16, block_k=16)

  def loss(impl, q, k, v):
    f = lambda q, k, v: ops.attention(q, k, v, impl=impl, pallas=blocks)  # noqa: E731
    return jnp.sum(jax.checkpoint(f, policy=remat.POLICIES["dots_kernels"])(q, k, v) ** 2)

  ref = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)  # one compile each
  got = jax.jit(jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-4)
  for a, b in zip(got[1], ref[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_accepts_exactly_the_policies_remat_defines():
  """config.REMAT_POLICIES (checked before JAX starts) lists `none` plus every policy of models/remat.py."""
  from efficientllm_jax import config as config_lib
  assert config_lib.REMAT_POLICIES == ("none", *remat.POLICIES)
