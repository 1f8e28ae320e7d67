"""Chunked cross-entropy against a plain numpy log-softmax over the full vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax.train.loss import cross_entropy, logsumexp_one_pass, xla_rows


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


def _numpy_grads(h, e, y, mask):
  """d(sum of masked token losses) / d(h, e): (softmax - onehot) * mask, then the two matmuls, in float64."""
  h2 = h.reshape(-1, h.shape[-1]).astype(np.float64)
  logits = h2 @ e.astype(np.float64).T
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(p)), y.reshape(-1)] -= 1
  d = p * mask.reshape(-1, 1)
  return (d @ e).reshape(h.shape), d.T @ h2


@pytest.mark.parametrize("chunk", [0, 5, 14])
def test_gradients_match_reference(chunk):
  """The fused backward (gradients formed in the forward chunk loop) against the closed form, with a mask and a
  sequence length (9) no chunk size divides."""
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 9, 8)).astype(np.float32)
  e = rng.normal(size=(40, 8)).astype(np.float32)
  y = rng.integers(0, 40, size=(2, 9))
  mask = (rng.random((2, 9)) > 0.3).astype(np.float32)
  scale = 0.37  # a cotangent other than 1 reaches both gradients

  def f(h, e):
    return scale * cross_entropy(h, e, jnp.asarray(y), jnp.asarray(mask), chunk=chunk)[0]

  dh, de = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(e))
  ref_dh, ref_de = _numpy_grads(h, e, y, mask)
  np.testing.assert_allclose(dh, scale * ref_dh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(de, scale * ref_de, rtol=1e-4, atol=1e-6)


def test_bf16_compute_is_close_and_gradient_dtypes_follow_inputs():
  """bf16 hidden states with an fp32 table (the training setup): loss and gradients near the fp32 closed form;
  dh comes back in bf16 and the table's gradient in fp32."""
  rng = np.random.default_rng(2)
  h = rng.normal(size=(2, 16, 32)).astype(np.float32)
  e = (0.2 * rng.normal(size=(64, 32))).astype(np.float32)
  y = rng.integers(0, 64, size=(2, 16))
  loss = lambda h, e: cross_entropy(h, e, jnp.asarray(y), chunk=8)[0]  # noqa: E731
  hb = jnp.asarray(h, jnp.bfloat16)
  value, (dh, de) = jax.value_and_grad(loss, argnums=(0, 1))(hb, jnp.asarray(e))
  assert dh.dtype == jnp.bfloat16 and de.dtype == jnp.float32
  hq = np.asarray(hb, np.float32)  # the reference sees the same rounded inputs
  ref_total, _ = _numpy_ce(hq, e, y, np.ones_like(y, np.float32))
  ref_dh, ref_de = _numpy_grads(hq, e, y, np.ones_like(y, np.float32))
  np.testing.assert_allclose(float(value), ref_total, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(dh, np.float32), ref_dh, atol=2e-2 * np.abs(ref_dh).max())
  np.testing.assert_allclose(np.asarray(de), ref_de, atol=2e-2 * np.abs(ref_de).max())


def test_table_gradient_is_the_fp32_sum_never_rounded():
  """With bf16 hidden states and the fp32 table (one chunk), the table's gradient is dlogits^T h summed in fp32 and
  returned as it is: equal to the float64 sum of the step's own bf16 dlogits (recomputed here by xla_rows on the
  same logits) to fp32 accuracy, where rounding it to bf16 on the way out would be off by up to 2^-9."""
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
  e = jnp.asarray(0.3 * rng.normal(size=(64, 32)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 64, size=(2, 16)))
  de = jax.jit(jax.grad(lambda e: cross_entropy(h, e, y, impl="xla")[0]))(e)
  assert de.dtype == jnp.float32
  logits = jnp.einsum("bcd,vd->bcv", h, e.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  _, _, d = xla_rows(logits, y, jnp.ones(y.shape, jnp.float32), jnp.bfloat16)
  ref = np.einsum("bcv,bcd->vd", np.asarray(d, np.float64), np.asarray(h, np.float64))
  np.testing.assert_allclose(np.asarray(de), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  assert np.abs(np.asarray(de, np.float64) - np.asarray(de.astype(jnp.bfloat16), np.float64)).max() > 0


def test_one_pass_logsumexp_matches_numpy():
  """The running (max, sum of exp) reduction against float64 numpy: wide magnitudes (a plain sum of exp would
  overflow at 800), rows of -inf, and a reduction over a middle axis."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(5, 7, 300)) * np.array([1.0, 30.0, 800.0, 1e-3, 5.0])[:, None, None]).astype(np.float32)
  x[4, 2] = -np.inf
  finite = np.where(np.isinf(x), 0.0, x).astype(np.float64)  # the -inf row's reference is set below
  ref = np.log(np.exp(finite - finite.max(-1, keepdims=True)).sum(-1)) + finite.max(-1)
  ref[4, 2] = -np.inf
  got = np.asarray(jax.jit(logsumexp_one_pass)(jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert got[4, 2] == -np.inf
  mid = np.asarray(logsumexp_one_pass(jnp.asarray(x[:4]), axis=1))
  np.testing.assert_allclose(mid, np.asarray(jax.nn.logsumexp(jnp.asarray(x[:4]), axis=1)), rtol=1e-6)


def test_bf16_logits_close_to_reference_and_bad_dtype_named():
  """logits_dtype=bfloat16 (the LM-head matmul writes bf16 logits, fp32 softmax): loss and gradients near the
  float64 closed form; an unknown dtype names the config key."""
  rng = np.random.default_rng(4)
  h = rng.normal(size=(2, 12, 16)).astype(np.float32)
  e = (0.5 * rng.normal(size=(96, 16))).astype(np.float32)
  y = rng.integers(0, 96, size=(2, 12))
  loss = lambda h, e: cross_entropy(h, e, jnp.asarray(y), chunk=8, logits_dtype="bfloat16")[0]  # noqa: E731
  value, (dh, de) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(e))
  ones = np.ones_like(y, np.float32)
  ref_total, _ = _numpy_ce(h, e, y, ones)
  ref_dh, ref_de = _numpy_grads(h, e, y, ones)
  np.testing.assert_allclose(float(value), ref_total, rtol=5e-3)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, atol=2e-2 * np.abs(ref_dh).max())
  np.testing.assert_allclose(np.asarray(de), ref_de, atol=2e-2 * np.abs(ref_de).max())
  fp32 = float(cross_entropy(jnp.asarray(h), jnp.asarray(e), jnp.asarray(y), chunk=8)[0])
  assert abs(float(value) - fp32) > 0  # the option reaches the matmul: bf16 logits round differently
  with pytest.raises(ValueError, match="train.logits_dtype='float16' is not one of"):
    cross_entropy(jnp.asarray(h), jnp.asarray(e), jnp.asarray(y), logits_dtype="float16")
