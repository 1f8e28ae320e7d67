"""kernels/xent (softmax cross-entropy rows in one Pallas kernel) in interpret mode against float64 numpy, the loss
with train.loss_impl=pallas against the closed form, and the kernel's lowering to Triton for an H100 (no GPU)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax import config as config_lib
from efficientllm_jax.kernels.xent import reference, softmax_xent
from efficientllm_jax.parallel import sharding as sh
from efficientllm_jax.train.loss import cross_entropy, resolve_impl
from tests.conftest import tiny_config
from tests.test_loss import _numpy_ce, _numpy_grads


def _reference(x, y, w):
  x = np.asarray(x, np.float64)
  mx = x.max(1, keepdims=True)
  lse = np.log(np.exp(x - mx).sum(1)) + mx[:, 0]
  d = np.exp(x - lse[:, None])
  d[np.arange(len(x)), y] -= 1
  return lse, x[np.arange(len(x)), y], d * w[:, None]


@pytest.mark.parametrize("dtype,v,block_v", [(jnp.float32, 1000, 256), (jnp.bfloat16, 1000, 256),
                                             (jnp.float32, 100, 2048), (jnp.float32, 512, 128)])
def test_rows_match_float64(dtype, v, block_v):
  """V not a multiple of the tile (the last tile moved back, overlapping the one before), V below the tile, and
  V a multiple of it; targets at 0, V-1 and in the overlapped columns; weights 0, 1 and 0.5."""
  rng = np.random.default_rng(0)
  r = 7
  x = jnp.asarray(rng.normal(size=(r, v)) * 6, dtype)
  y = np.array([0, v - 1, v - 250 if v > 256 else 3, 5, 17, v // 2, 1]) % v  # 750 / 50: overlapped columns
  w = np.array([1, 1, 0, 1, 0.5, 1, 1], np.float32)
  lse, tgt, d = jax.jit(lambda a, b, c: softmax_xent(a, b, c, block_v=block_v))(x, jnp.asarray(y), jnp.asarray(w))
  ref_lse, ref_tgt, ref_d = _reference(np.asarray(x.astype(jnp.float32)), y, w)
  assert lse.dtype == tgt.dtype == jnp.float32 and d.dtype == dtype and d.shape == (r, v)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(tgt), ref_tgt, rtol=1e-6)
  tol = 1e-6 if dtype == jnp.float32 else 8e-3  # bf16 dlogits: one rounding
  np.testing.assert_allclose(np.asarray(d.astype(jnp.float32)), ref_d, atol=tol)
  assert np.all(np.asarray(d)[2] == 0)  # weight 0: a masked token has no gradient
  plain = softmax_xent(x, jnp.asarray(y), jnp.asarray(w), block_v=block_v, evict=False)  # no L2 hints: same values
  for a, b in zip(plain, (lse, tgt, d)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ref = reference(x, jnp.asarray(y), jnp.asarray(w))  # the jnp stand-in used when interpreting in a shard_map
  for got, want in zip(ref, (ref_lse, ref_tgt, ref_d)):
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=1e-6, atol=tol)


def test_out_dtype_and_argument_errors():
  x = jnp.zeros((2, 64), jnp.float32)
  _, _, d = softmax_xent(x, jnp.zeros(2, jnp.int32), jnp.ones(2), out_dtype=jnp.bfloat16)
  assert d.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(d[0, 1:], np.float32), 1 / 64, rtol=1e-2)  # uniform softmax
  with pytest.raises(ValueError, match=r"needs logits \[R, V\] with targets and weights \[R\]"):
    softmax_xent(x, jnp.zeros(3, jnp.int32), jnp.ones(2))
  with pytest.raises(ValueError, match="block_v=100 must be a power of two"):
    softmax_xent(x, jnp.zeros(2, jnp.int32), jnp.ones(2), block_v=100)


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
def test_loss_through_the_kernel_matches_reference(logits_dtype):
  """cross_entropy(impl="pallas"): loss and both gradients against float64, with a mask and chunks (9 positions,
  chunk 5: a padded chunk); equal to impl="xla" where both are fp32."""
  rng = np.random.default_rng(3)
  h = rng.normal(size=(2, 9, 16)).astype(np.float32)
  e = (0.5 * rng.normal(size=(300, 16))).astype(np.float32)
  y = rng.integers(0, 300, size=(2, 9))
  mask = (rng.random((2, 9)) > 0.3).astype(np.float32)

  def run(impl):
    loss = lambda h, e: cross_entropy(h, e, jnp.asarray(y), jnp.asarray(mask), chunk=5,  # noqa: E731
                                      logits_dtype=logits_dtype, impl=impl)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(e))

  value, (dh, de) = run("pallas")
  ref_total, _ = _numpy_ce(h, e, y, mask)
  ref_dh, ref_de = _numpy_grads(h, e, y, mask)
  rtol = 1e-5 if logits_dtype == "float32" else 5e-3
  np.testing.assert_allclose(float(value), ref_total, rtol=rtol)
  scale = 1e-5 if logits_dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(dh), ref_dh, atol=scale * np.abs(ref_dh).max())
  np.testing.assert_allclose(np.asarray(de), ref_de, atol=scale * np.abs(ref_de).max())
  if logits_dtype == "float32":
    xla_value, (xla_dh, xla_de) = run("xla")
    np.testing.assert_allclose(float(value), float(xla_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(xla_dh), atol=1e-6)
    np.testing.assert_allclose(np.asarray(de), np.asarray(xla_de), atol=1e-6)


def test_bad_loss_impl_is_a_config_error():
  with pytest.raises(config_lib.ConfigError,
                     match="train.loss_impl='triton' is not known: use one of auto, xla, pallas"):
    config_lib.validate(tiny_config(**{"train.loss_impl": "triton"}))
  with pytest.raises(ValueError, match="train.loss_impl='cuda' is not one of"):
    cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((8, 4)), jnp.zeros((1, 2), jnp.int32), impl="cuda")


class _FakeGpu:
  platform, compute_capability = "gpu", "9.0"


def test_auto_takes_the_kernel_on_one_nvidia_gpu_only(monkeypatch, caplog):
  assert resolve_impl("auto") == "xla"  # this CPU
  assert resolve_impl("pallas") == "pallas" and resolve_impl("xla") == "xla"
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeGpu()])
  with caplog.at_level(logging.INFO):
    assert resolve_impl("auto") == "pallas"
  assert "train.loss_impl=auto takes pallas (the Triton kernel, kernels/xent, platform gpu)" in caplog.text
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
  with sh.activation_sharding(mesh, {}):  # one device: still the kernel
    assert resolve_impl("auto") == "pallas"
  with sh.activation_sharding(jax.sharding.AbstractMesh((2,), ("data",)), {}):  # several: XLA until the kernel is measured under the loss's shard_map
    assert resolve_impl("auto") == "xla"


def test_lowers_to_one_triton_kernel_at_the_0_5b_chunk(triton_h100):
  """The 0.5B loss chunk (8192 rows of bf16 logits over the 151,936-token vocabulary) lowers to Triton IR."""
  args = (jax.ShapeDtypeStruct((8192, 151936), jnp.bfloat16), jax.ShapeDtypeStruct((8192,), jnp.int32),
          jax.ShapeDtypeStruct((8192,), jnp.float32))
  hlo = jax.jit(lambda a, b, c: softmax_xent(a, b, c, interpret=False)).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert triton_h100(hlo) == 1


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel: needs a CUDA GPU")
def test_compiles_on_gpu_and_matches_reference():
  """The compiled kernel at a 0.5B-like chunk (bf16 logits over the 151,936-token vocabulary) against the jnp
  reference."""
  rng = np.random.default_rng(5)
  r, v = 256, 151936
  x = jnp.asarray(rng.normal(size=(r, v)) * 4, jnp.bfloat16)
  y = jnp.asarray(rng.integers(0, v, r))
  w = jnp.asarray((rng.random(r) > 0.1).astype(np.float32))
  got = jax.jit(lambda a, b, c: softmax_xent(a, b, c, interpret=False))(x, y, w)
  want = jax.jit(reference)(x, y, w)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got[2], np.float32), np.asarray(want[2], np.float32), atol=2e-3)
