"""Chunked cross-entropy against a plain numpy log-softmax over the full vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax.train.loss import cross_entropy


def _numpy_ce(h, e, y, mask):
  logits = h.reshape(-1, h.shape[-1]).astype(np.float64) @ e.astype(np.float64).T
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(logp)), y.reshape(-1)]
  m = mask.reshape(-1)
  return (nll * m).sum(), m.sum()


@pytest.mark.parametrize("chunk", [0, 7, 16, 1000])
def test_chunked_cross_entropy_matches_reference(chunk):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 11, 8)).astype(np.float32)
  e = rng.normal(size=(50, 8)).astype(np.float32)
  y = rng.integers(0, 50, size=(3, 11))
  mask = (rng.random((3, 11)) > 0.2).astype(np.float32)
  total, count = cross_entropy(jnp.asarray(h), jnp.asarray(e), jnp.asarray(y), jnp.asarray(mask), chunk=chunk)
  ref_total, ref_count = _numpy_ce(h, e, y, mask)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  assert float(count) == ref_count


def test_chunked_gradients_equal_unchunked():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 40, size=(2, 9)))
  grad = lambda chunk: jax.grad(lambda h, e: cross_entropy(h, e, y, chunk=chunk)[0], argnums=(0, 1))(h, e)
  for a, b in zip(grad(0), grad(5)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
