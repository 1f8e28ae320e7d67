"""Mosaic GPU flash attention (kernels/flash/mosaic.py): on CPU in Pallas' GPU interpret mode (threads, barriers,
TMA simulated) against the dense fp32 reference, outputs and gradients; its Mosaic GPU lowering for CUDA (no GPU
needed: catches layout and shape errors); on a GPU the compiled kernels against cuDNN."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax.bench import profile
from efficientllm_jax.config import ConfigError
from efficientllm_jax.kernels.flash import mosaic
from efficientllm_jax.kernels.flash.reference import reference_attention
from efficientllm_jax.models.attention import ops
from efficientllm_jax.parallel import sharding as sh


def _qkv(seed, b, t, h, kvh, d, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 4)
  shapes = ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d), (b, t, h, d))
  return [jax.random.normal(kk, s, jnp.float32).astype(dtype) for kk, s in zip(ks, shapes)]


def _dense(q, k, v, causal):
  """fp32 softmax attention with repeated K/V heads; the causal case is kernels/flash/reference.py."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if causal:
    return reference_attention(q, k, v)
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  w = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1]), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", w, v)


def _out_and_grads(fn, q, k, v, do):
  """fn's output and the (q, k, v) gradients for cotangent do, as one compiled program (not op by op)."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do.astype(out.dtype)))
  return jax.jit(run)(q, k, v, do)


@pytest.mark.parametrize("t,h,kvh,d,causal,blocks", [
    # GQA (2 query heads per K/V head), causal, d 128's blocks (ops.mosaic_blocks(128): the separate dq kernel,
    # the overlap, CTAs launched longest first); d 64's run in test_attention_impl_mosaic_dispatch, the row-major
    # launch (heavy_first=False) in the GPU test
    (256, 2, 1, 128, True, dict()),
    (128, 2, 1, 128, False, dict(fused_dq=True)),  # no mask, d 128, dq by reduce-add inside the dk / dv kernel
])
def test_interpret_matches_reference(t, h, kvh, d, causal, blocks):
  """bf16 inputs against the fp32 reference at bf16 tolerance. At T = 256 two CTAs run along the sequence, so the
  causal loop bounds, the diagonal masks and the ring of slots all run; at 128 the dq / dk / dv loops still take
  several steps (64-row blocks, two query heads per K/V head)."""
  q, k, v, do = _qkv(0, 1, t, h, kvh, d)
  p = mosaic.MosaicParams(scale=1 / math.sqrt(d), causal=causal, blocks=mosaic.MosaicBlocks(**blocks),
                          interpret=True)
  got = _out_and_grads(lambda q, k, v: mosaic.mosaic_attention(q, k, v, p), q, k, v, do)
  want = _out_and_grads(lambda q, k, v: _dense(q, k, v, causal), q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert g.shape == w.shape
    err = float(np.abs(g - w).max()) / float(np.abs(w).max())
    assert err < 1.5e-2, (name, err)


def test_wide_forward_blocks_match_reference():
  """d 64's forward at a multiple of 256 (ops.mosaic_blocks(64, 512)): 256-key blocks in 3 slots, where the last
  row block's warpgroups take one unmasked and one masked step (its backward runs in test_attention_impl_mosaic_
  dispatch at T = 256). Output and log-sum-exp against the fp32 reference."""
  q, k, v, _ = _qkv(3, 1, 512, 2, 1, 64)
  p = mosaic.MosaicParams(scale=0.125, causal=True, blocks=ops.mosaic_blocks(64, 512), interpret=True)
  assert (p.blocks.fwd_k, p.blocks.fwd_stages) == (256, 3)
  o, lse = jax.jit(lambda q, k, v: mosaic._forward(q, k, v, p))(q, k, v)
  want = _dense(q, k, v, True)
  assert float(jnp.abs(o.astype(jnp.float32) - want).max()) < 1.5e-2 * float(jnp.abs(want).max())
  qf, kf = (x.astype(jnp.float32) for x in (q, jnp.repeat(k, 2, axis=2)))
  logits = jnp.einsum("bthd,bshd->bhts", qf, kf) * 0.125
  logits = jnp.where(jnp.tril(jnp.ones((512, 512), bool)), logits, -jnp.inf)
  ref_lse = jax.nn.logsumexp(logits, axis=-1) * mosaic.LOG2E  # the kernel keeps it in base 2
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("h,kvh,d", [(12, 2, 128)])
def test_mosaic_gpu_lowering_for_cuda(h, kvh, d):
  """The Qwen2.5-1.5B head layout lowers to Mosaic GPU for CUDA (forward and both backwards; d 64 compiled on the
  GPU in benchmarks/RESULTS.md, session 6, and runs here in interpret mode)."""
  q = jax.ShapeDtypeStruct((1, 512, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 512, kvh, d), jnp.bfloat16)
  for fused in (True, False):
    p = mosaic.MosaicParams(scale=0.1, causal=True, blocks=mosaic.MosaicBlocks(fused_dq=fused))

    def f(q, k, v, p=p):
      return _out_and_grads(lambda q, k, v: mosaic.mosaic_attention(q, k, v, p), q, k, v, q)
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3, "expected the forward and the backward kernels as Mosaic GPU calls"
    names = {"mosaic_flash_forward", "mosaic_flash_dkv"} | (set() if fused else {"mosaic_flash_dq"})
    assert all(n in text for n in names) and {profile.category(n) for n in names} == {"attention"}


def test_unsupported_names_the_reason():
  q, k, v, _ = _qkv(0, 1, 256, 4, 2, 64)
  assert mosaic.unsupported(q, k, v) is None
  assert "bias, window or query offset" in mosaic.unsupported(q, k, v, window=128)
  q3, k3, v3, _ = _qkv(0, 1, 200, 4, 2, 64)
  assert "multiple of 128 (got T=200, S=200)" in mosaic.unsupported(q3, k3, v3)
  q4, k4, v4, _ = _qkv(0, 1, 256, 4, 2, 96)
  assert "head dims of 64 or 128 (got 96 / 96)" in mosaic.unsupported(q4, k4, v4)
  assert "bf16 / fp16" in mosaic.unsupported(*(x.astype(jnp.float32) for x in (q, k, v)))
  p = mosaic.MosaicParams(scale=0.125, causal=True, interpret=True)
  with pytest.raises(ValueError, match=r"multiple of 128 \(got T=200, S=200\)"):
    mosaic.mosaic_attention(q3, k3, v3, p)
  bad = mosaic.MosaicParams(scale=0.125, causal=True, blocks=mosaic.MosaicBlocks(dq_k=32), interpret=True)
  with pytest.raises(ValueError, match="dq_k / dkv_q 64 or 128 \\(got 128 / 32 / 64\\)"):
    mosaic.mosaic_attention(q, k, v, bad)
  neg = mosaic.MosaicParams(scale=0.125, causal=True, blocks=mosaic.MosaicBlocks(fwd_stages=-1), interpret=True)
  with pytest.raises(ValueError, match=r"stages must be at least 1 and fwd_stages 0 or more \(got 2 / -1\)"):
    mosaic.mosaic_attention(q, k, v, neg)
  q6, k6, v6, _ = _qkv(0, 1, 384, 4, 2, 64)  # a multiple of 128, not of 256-key forward blocks
  wide = mosaic.MosaicParams(scale=0.125, causal=True, blocks=mosaic.MosaicBlocks(fwd_k=256), interpret=True)
  with pytest.raises(ValueError, match=r"fwd_k=256 needs a sequence length that is a multiple of it \(got 384\)"):
    mosaic.mosaic_attention(q6, k6, v6, wide)
  # 128-row dk / dv blocks with the fused dq at d 128: 322 KB of buffers (Mosaic GPU's count on lowering: 329864 B)
  q5, k5, v5, _ = _qkv(0, 1, 256, 4, 2, 128)
  big = mosaic.MosaicParams(scale=0.1, causal=True, blocks=mosaic.MosaicBlocks(dkv_q=128, fused_dq=True))
  with pytest.raises(ValueError, match=r"needs 322 KB of shared memory in the dk / dv kernel at d 128, more than "
                                       r"the 227 KB of a Hopper SM: lower its block sizes or stages"):
    mosaic.mosaic_attention(q5, k5, v5, big)


def test_attention_impl_mosaic_dispatch(monkeypatch):
  """attention.impl=mosaic through models/attention/ops.py: on CPU the interpreted kernels with the per-head-dim
  blocks (d 64: dq fused, each warpgroup forming its 64 rows of 128-row query blocks) equal the xla path, values
  and gradients; a call they cannot take, or a GPU that is not a Hopper, is a ConfigError naming the reason."""
  q, k, v, do = _qkv(2, 1, 256, 2, 1, 64)
  assert ops.mosaic_blocks(64) == mosaic.MosaicBlocks(fused_dq=True, dkv_q=128, overlap=False)
  assert ops.mosaic_blocks(64, 384) == ops.mosaic_blocks(64)  # 256-key forward blocks need a multiple of 256
  assert ops.mosaic_blocks(64, 8192) == mosaic.MosaicBlocks(fwd_k=256, fwd_stages=3, fused_dq=True, dkv_q=128,
                                                            overlap=False)
  assert ops.mosaic_blocks(64).heavy_first and ops.mosaic_blocks(128).heavy_first
  got = _out_and_grads(lambda q, k, v: ops.attention(q, k, v, impl="mosaic"), q, k, v, do)
  want = _out_and_grads(lambda q, k, v: ops.attention(q, k, v, impl="xla"), q, k, v, do)
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert float(np.abs(g - w).max()) / float(np.abs(w).max()) < 1.5e-2
  with pytest.raises(ConfigError, match="impl='mosaic' cannot run this call: the Mosaic GPU kernels take no bias, "
                                        "window or query offset; use attention.impl=auto"):
    ops.attention(q, k, v, impl="mosaic", window=64)
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
  assert "compute capability (8, 0)" in ops.mosaic_supports(q, k, v, None)


def test_auto_takes_mosaic_where_measured_faster(monkeypatch, caplog):
  """attention.impl=auto on a Hopper GPU: the Mosaic kernels at the head dims and lengths where they beat cuDNN
  (MOSAIC_AUTO_MAX_SEQ: d 64 to 32K, d 128 to 8K) with enough dk / dv CTAs a device (MOSAIC_AUTO_MIN_DKV_CTAS),
  cuDNN beyond, on a mesh of several devices, for calls they cannot take, and before Hopper."""
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
  monkeypatch.setattr(ops, "mosaic_attention", lambda q, k, v, scale: "mosaic")
  monkeypatch.setattr(ops, "cudnn_attention", lambda q, k, v, scale, window=0: "cudnn")

  def auto(t, d, h=12, kvh=2, b=None, **kw):  # b: the measured sweep's 16384 tokens by default
    b = b or max(1, 16384 // t)
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16)
    return ops.attention(q, kv, kv, impl="auto", **kw)

  with caplog.at_level(logging.INFO):
    assert [auto(2048, 64), auto(8192, 128), auto(32768, 64), auto(8192, 64, 14, 2)] == ["mosaic"] * 4
  assert "auto takes the Mosaic GPU kernels (head dim 128, T 8192" in caplog.text  # which kernel ran is logged
  assert auto(16384, 128) == "cudnn"  # d 128 past 8K (at 32K: 0.92x cuDNN)
  assert auto(65536, 64) == "cudnn"  # not measured
  assert auto(8192, 128, window=1024) == "cudnn"  # no window in the Mosaic kernels
  assert auto(8000, 128) == "cudnn"  # T not a multiple of 128
  assert auto(8192, 192) == "cudnn"
  # the 0.5B step at micro-batch 1: 1 x 2 K/V heads x 64 key blocks = 128 CTAs, under the 256 measured to win
  assert ops.mosaic_dkv_ctas(jax.ShapeDtypeStruct((1, 8192, 14, 64), jnp.bfloat16),
                             jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.bfloat16)) == 128
  with caplog.at_level(logging.INFO):
    assert auto(8192, 64, 14, 2, b=1) == "cudnn"
  assert "dk / dv kernel would launch 128 CTAs a device, below ops.MOSAIC_AUTO_MIN_DKV_CTAS=256" in caplog.text
  assert auto(8192, 64, 14, 2, b=2) == auto(8192, 64, 14, 2, b=4) == "mosaic"
  assert auto(2048, 64, b=1) == "cudnn"
  # CTAs are counted per device: micro-batch 4 split over data=4 is one sequence a device
  with sh.activation_sharding(jax.sharding.AbstractMesh((4,), ("data",)), {"batch": "data"}):
    assert ops.mosaic_dkv_ctas(jax.ShapeDtypeStruct((4, 8192, 14, 64), jnp.bfloat16),
                               jax.ShapeDtypeStruct((4, 8192, 2, 64), jnp.bfloat16)) == 128
    # on a mesh of several devices auto keeps cuDNN, even with CTAs enough (16 / 4 = 4 sequences a device: 512):
    # the kernels per device under shard_map have not run on GPUs; impl=mosaic still takes them there
    with caplog.at_level(logging.INFO):
      assert auto(8192, 64, 14, 2, b=16) == "cudnn"
    assert "auto takes cuDNN on a mesh of several devices" in caplog.text
    assert ops.attention(*(jax.ShapeDtypeStruct((16, 8192, h, 64), jnp.bfloat16) for h in (14, 2, 2)),
                         impl="mosaic") == "mosaic"
  with sh.activation_sharding(jax.sharding.AbstractMesh((1,), ("data",)), {"batch": "data"}):
    assert auto(8192, 64, 14, 2, b=4) == "mosaic"  # a mesh of one device is one device
  monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
  assert auto(8192, 128) == "cudnn"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a Hopper GPU (compiled Mosaic GPU kernels)")
@pytest.mark.parametrize("h,kvh,d,blocks", [
    (12, 2, 128, dict()), (12, 2, 128, dict(fused_dq=True)), (14, 2, 64, dict(fused_dq=True, overlap=False)),
    (14, 2, 64, dict(fused_dq=True, dkv_q=128, overlap=False)), (14, 2, 64, dict()),
    (12, 2, 128, dict(heavy_first=False)),
    # 0.5B's d 64 blocks at a multiple of 256 (ops.mosaic_blocks(64, 2048)), GQA, MQA and MHA (auto sends the
    # attention sweep's mqa / mha 0.5B runs here)
    (14, 2, 64, dict(fwd_k=256, fwd_stages=3, fused_dq=True, dkv_q=128, overlap=False)),
    (14, 1, 64, dict(fwd_k=256, fwd_stages=3, fused_dq=True, dkv_q=128, overlap=False)),
    (14, 14, 64, dict(fwd_k=256, fwd_stages=3, fused_dq=True, dkv_q=128, overlap=False))])
def test_gpu_compiled_matches_cudnn(h, kvh, d, blocks):
  """The compiled kernels vs cuDNN at S = 2048, causal, bf16: outputs and gradients within 2 % of the largest."""
  q, k, v, do = _qkv(1, 1, 2048, h, kvh, d)
  p = mosaic.MosaicParams(scale=1 / math.sqrt(d), causal=True, blocks=mosaic.MosaicBlocks(**blocks))
  got = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: mosaic.mosaic_attention(q, k, v, p), *a))(q, k, v, do)
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
  want = jax.jit(lambda *a: _out_and_grads(cudnn, *a))(q, k, v, do)
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert float(np.abs(g - w).max()) / float(np.abs(w).max()) < 2e-2
