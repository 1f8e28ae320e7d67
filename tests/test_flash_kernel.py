"""Flash-attention kernel (kernels/flash, interpret mode on CPU) vs independent references: outputs and gradients.

References: kernels/flash/reference.py (dense fp32 softmax, repeated K/V heads) and ops.xla_attention with the
positional bias objects' own dense() (LUT gather), so the kernel's row flattening, base-2 online softmax,
near-bias strips (far blocks without bias) and block skipping are all checked against code that shares none of
them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax.config import ConfigError, validate
from efficientllm_jax.kernels.flash import flash_attention, reference_attention
from efficientllm_jax.kernels.flash import kernel as kernel_lib
from efficientllm_jax.models.attention import ops
from efficientllm_jax.models.positional import ALiBiBias, T5Bias, alibi_slopes
from tests.conftest import tiny_config


def _qkv(seed, b, t, s, h, kvh, dqk, dv, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, dqk), dtype)
  k = jax.random.normal(ks[1], (b, s, kvh, dqk), dtype)
  v = jax.random.normal(ks[2], (b, s, kvh, dv), dtype)
  do = jax.random.normal(ks[3], (b, t, h, dv), dtype)
  return q, k, v, do


# Interpret-mode kernels are compile-bound on CPU: XLA's cheapest backend optimisation cuts that by about a third.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _out_and_grads(fn, args, do):
  """One jit: output and the cotangent-weighted gradients w.r.t. every arg (one compile per case)."""
  def run(*xs):
    out, vjp = jax.vjp(fn, *xs)
    return out, vjp(do)
  opts = FAST_COMPILE if jax.default_backend() == "cpu" else None
  return jax.jit(run).lower(*args).compile(compiler_options=opts)(*args)


def _close(got, want, atol=2e-5, rtol=1e-4):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol)


def _t5_kernel_vs_xla(seed, t, h, kvh, d, num_buckets, max_distance):
  """Outputs and (q, k, v, table) gradients of the flash kernel with a learned T5 table through ops (32-row /
  32-key tiles) against the xla path with the dense bias, for T = S = t; checks them and that every bucket gets
  a gradient (so the table check is not vacuous)."""
  q, k, v, do = _qkv(seed, 1, t, t, h, kvh, d, d)
  table = jax.random.normal(jax.random.key(seed + 9), (num_buckets, h))
  blocks = ops.PallasBlocks(block_q=32, block_k=32)

  def kernel(q, k, v, table):
    return ops.attention(q, k, v, impl="pallas", bias=T5Bias(table, num_buckets, max_distance), pallas=blocks)

  def xla(q, k, v, table):
    return ops.xla_attention(q, k, v, scale=d ** -0.5, bias=T5Bias(table, num_buckets, max_distance))

  got, want = _out_and_grads(kernel, (q, k, v, table), do), _out_and_grads(xla, (q, k, v, table), do)
  _close(got[0], want[0])
  _close(got[1][:3], want[1][:3])
  _close(got[1][3], want[1][3], atol=1e-4)  # the table gradient sums ~T*S/buckets terms
  assert float(jnp.abs(want[1][3]).min()) > 0


def test_gqa_causal_odd_lengths_with_relative_bias_through_ops():
  """GQA 4/2, T = S = 75 over 32-row / 32-key tiles (tails masked), 6 buckets / max distance 16: dq, dk, dv and
  d table."""
  _t5_kernel_vs_xla(0, 75, 4, 2, 32, 6, 16)


def test_t5_default_buckets_far_and_near_blocks_through_ops():
  """T5's default 32 buckets / max distance 128 (bias constant from d = 113 on), T = S = 301: kv blocks far from
  the diagonal (no bias in the kernel) and near it (bias strip), GQA 6/2 over 32-row tiles (3 strip phases, rows
  of one position split across tiles), odd tails. Outputs and q, k, v, table gradients vs the dense model bias."""
  _t5_kernel_vs_xla(10, 301, 6, 2, 16, 32, 128)


@pytest.mark.parametrize("t,s,h,kvh,window,q_offset,block_q,block_k", [
    (50, 90, 7, 1, 0, 40, 32, 16),  # MQA G = 7: 7 strip phases; queries at offset 40
    (61, 61, 2, 2, 13, 0, 16, 32),  # MHA, window 13 < D = 16: every visible block is near
    (40, 100, 6, 2, 30, 60, 16, 16),  # window 30 > D: far blocks cut by the window on the left
])
def test_t5_window_offset_vs_reference(t, s, h, kvh, window, q_offset, block_q, block_k):
  """Step bias (T5 8 buckets / max distance 20) vs the dense reference: windows below and above the near distance,
  query offsets, MHA / MQA; outputs and q, k, v, bias-coefficient gradients."""
  q, k, v, do = _qkv(t + s, 1, t, s, h, kvh, 16, 16)
  kind, thr, coef = T5Bias(jax.random.normal(jax.random.key(s), (8, h)), 8, 20).kernel_terms()
  kw = dict(window=window, q_offset=q_offset, bias_kind=kind, bias_thresholds=thr)

  def kernel(q, k, v, coef):
    return flash_attention(q, k, v, bias_coef_nh=coef, block_q=block_q, block_k=block_k, **kw)

  def ref(q, k, v, coef):
    return reference_attention(q, k, v, bias_coef_nh=coef, **kw)

  got, want = _out_and_grads(kernel, (q, k, v, coef), do), _out_and_grads(ref, (q, k, v, coef), do)
  _close(got, want, atol=3e-5)


def test_t5_strips_hold_the_bucket_bias_at_every_distance():
  """The kernel's near-bias strips (what each near tile loads) equal the model's dense T5 bias minus its far value
  at every (row, key) they cover with distance 0 <= d < D, and 0 beyond D; and the dense bias is that far value at
  every distance >= D up to 400 (what lets the far blocks skip the bias)."""
  nb, md, h, kvh, bq, bk = 32, 128, 12, 2, 64, 64
  table = jax.random.normal(jax.random.key(3), (nb, h))
  bias = T5Bias(table, nb, md)
  kind, thr, coef = bias.kernel_terms()
  near, phases, strips = kernel_lib._near_strips(thr, coef, kvh, h // kvh, bq, bk)
  g = h // kvh
  far = bias.dense(jnp.asarray([near]), jnp.zeros(1, jnp.int32))[:, 0, 0]  # [H]
  dense_far = bias.dense(jnp.arange(near, 400), jnp.zeros(1, jnp.int32))[:, :, 0]
  np.testing.assert_array_equal(np.asarray(dense_far), np.broadcast_to(np.asarray(far)[:, None], dense_far.shape))
  assert phases == 3 and near == max(thr)
  for p in range(phases):
    r0 = p * bq
    rows = r0 + np.arange(bq)
    pos, head = rows // g, rows % g
    keys = r0 // g - near + 1 - bk + np.arange(strips.shape[-1])  # column 0's key, then one key per column
    dist = pos[:, None] - keys[None, :]
    dense = bias.dense(jnp.asarray(pos), jnp.asarray(keys))  # [H, bq, width]
    for kk in range(kvh):
      want = np.asarray(dense - far[:, None, None])[kk * g + head, np.arange(bq)]
      want = np.where((dist >= 0) & (dist < near), want, 0.0)
      np.testing.assert_allclose(np.asarray(strips[kk, p]), want, atol=1e-6)


def test_window_query_offset_alibi_unequal_head_dims():
  """GQA 6/2 (rows interleave 3 heads), 40 queries at offset 35 over 75 keys, window 20 (kv blocks before the
  window are skipped), ALiBi slopes, q/k dim 48 (= 32 + 16 column chunks) != v dim 16."""
  q, k, v, do = _qkv(1, 2, 40, 75, 6, 2, 48, 16)
  bias = ALiBiBias(jnp.asarray(alibi_slopes(6), jnp.float32))
  kind, thr, coef = bias.kernel_terms()

  def kernel(q, k, v):
    return flash_attention(q, k, v, window=20, q_offset=35, bias_kind=kind, bias_thresholds=thr, bias_coef_nh=coef,
                           block_q=16, block_k=16)

  def xla(q, k, v):
    return ops.xla_attention(q, k, v, scale=48 ** -0.5, bias=bias, window=20, q_offset=35)

  _close(_out_and_grads(kernel, (q, k, v), do), _out_and_grads(xla, (q, k, v), do))


@pytest.mark.parametrize("h,kvh", [(2, 2), (3, 1)], ids=["mha", "mqa"])
def test_mha_mqa_bf16_window(h, kvh):
  """MHA (G = 1) and MQA (G = 3), bf16 inputs with fp32 accumulation, window of 9 over 33 tokens."""
  q, k, v, do = _qkv(3, 1, 33, 33, h, kvh, 16, 16, jnp.bfloat16)
  kernel = lambda q, k, v: flash_attention(q, k, v, window=9, scale=0.4, block_q=16, block_k=16)  # noqa: E731
  ref = lambda q, k, v: reference_attention(q, k, v, window=9, scale=0.4)  # noqa: E731
  _close(_out_and_grads(kernel, (q, k, v), do), _out_and_grads(ref, (q, k, v), do), atol=3e-2, rtol=3e-2)


def test_t5_kernel_terms_reproduce_the_bucket_table():
  """The threshold/delta form the kernel evaluates equals table[bucket(d)] for every distance (plain numpy)."""
  table = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
  kind, thr, coef = T5Bias(jnp.asarray(table), 32, 128).kernel_terms()
  assert kind == "step"
  d = np.arange(0, 300)
  got = (d[:, None] >= np.asarray(thr)[None, :]).astype(np.float32) @ np.asarray(coef)  # [d, H]
  want = np.moveaxis(np.asarray(T5Bias(jnp.asarray(table), 32, 128).dense(jnp.asarray(d), jnp.zeros(1, jnp.int32))),
                     0, -1)[:, 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("key,value,msg", [
    ("attention.impl", "flash", "attention.impl='flash' is not known"),
    ("attention.pallas.block_q", 48, "attention.pallas.block_q=48 must be a power of two >= 16"),
    ("attention.pallas.block_k", 8, "attention.pallas.block_k=8 must be a power of two >= 16"),
    ("attention.pallas.num_warps", 3, "attention.pallas.num_warps=3 must be 1, 2, 4, 8 or 16"),
    ("attention.pallas.num_stages", 0, "attention.pallas.num_stages=0 must be a positive integer"),
])
def test_pallas_config_errors(key, value, msg):
  with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
    validate(tiny_config(**{key: value}))


def test_pallas_config_accepted_and_read():
  cfg = validate(tiny_config(**{"attention.impl": "pallas", "attention.pallas.block_q": 128}))
  assert ops.PallasBlocks.from_config(cfg) == ops.PallasBlocks(block_q=128, block_k=64, num_warps=4, num_stages=2)


gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton kernel)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("h,kvh,dqk,dv,window,rel", [
    (12, 2, 128, 128, 0, False),  # Qwen2.5-1.5B layout
    (14, 2, 64, 64, 256, False),  # 0.5B layout, sliding window
    (16, 16, 192, 128, 0, False),  # MLA dims, no padding
    (12, 2, 128, 128, 0, True),  # T5 relative bias in the kernel
])
def test_gpu_compiled_kernel_matches_xla_bf16(h, kvh, dqk, dv, window, rel):
  """The compiled (Triton) kernel vs the xla path at S = 2048, bf16 inputs: outputs and gradients."""
  q, k, v, do = _qkv(4, 1, 2048, 2048, h, kvh, dqk, dv, jnp.bfloat16)
  table = jax.random.normal(jax.random.key(5), (32, h)) * 0.5
  bias = (lambda tb: T5Bias(tb, 32, 128)) if rel else (lambda tb: None)
  kernel = lambda q, k, v, tb: ops.attention(q, k, v, impl="pallas", bias=bias(tb), window=window)  # noqa: E731
  xla = lambda q, k, v, tb: ops.attention(q, k, v, impl="xla", bias=bias(tb), window=window)  # noqa: E731
  got = _out_and_grads(kernel, (q, k, v, table), do)
  want = _out_and_grads(xla, (q, k, v, table), do)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    scale = max(float(np.abs(w).max()), 1e-6)
    assert float(np.abs(g - w).max()) / scale < 3e-2, (g.shape, float(np.abs(g - w).max()), scale)


# ---------------------------------------------------------------------------------------------------------------
# Triton lowering for an H100 (no GPU needed): forward + both backward kernels of every layout the runs use


T5_TERMS = lambda h: T5Bias(jnp.ones((32, h)), 32, 128).kernel_terms()  # noqa: E731
ALIBI_TERMS = lambda h: ALiBiBias(jnp.asarray(alibi_slopes(h), jnp.float32)).kernel_terms()  # noqa: E731
LOWER_CASES = {  # t, s, h, kvh, dqk, dv, extra flash_attention kwargs
    "gqa12_2_d128": (1024, 1024, 12, 2, 128, 128, {}),
    "window": (1024, 1024, 12, 2, 128, 128, {"window": 256}),
    "mla_192_128": (512, 512, 16, 16, 192, 128, {}),
    "t5": (1024, 1024, 12, 2, 128, 128, {"bias": T5_TERMS}),
    "alibi": (1024, 1024, 12, 2, 128, 128, {"bias": ALIBI_TERMS}),
    "odd_lengths_offset": (1000, 1100, 12, 2, 128, 128, {"q_offset": 100}),
    "gqa14_2_d64_window": (1000, 1000, 14, 2, 64, 64, {"window": 256}),  # 0.5B: G = 7 rows per position
    "t5_gqa14_odd_offset": (1000, 1100, 14, 2, 64, 64, {"bias": T5_TERMS, "q_offset": 100}),  # 7 strip phases
}


DEFAULT_BLOCKS = (64, 64, 4, 2)  # block_q, block_k, warps, stages: flash_attention's and attention.pallas' defaults
DEFAULT_ONLY = ("gqa14_2_d64_window", "t5_gqa14_odd_offset")
LOWER_GRID = [(c, DEFAULT_BLOCKS) for c in LOWER_CASES] + [
    (c, b) for b in [(128, 64, 8, 2), (64, 128, 8, 2)] for c in LOWER_CASES if c not in DEFAULT_ONLY]


@pytest.mark.parametrize("case,blocks", LOWER_GRID, ids=[f"{c}-{'x'.join(map(str, b))}" for c, b in LOWER_GRID])
def test_flash_lowers_to_triton_for_h100(triton_h100, case, blocks):
  """fwd, dq and dkv kernels (3 Triton calls) lower with the Triton path (interpret=False, backend gpu) for bf16
  abstract inputs; for biases the gradient reaches the coefficients (T5 table deltas / ALiBi slopes)."""
  assert ops.PallasBlocks() == ops.PallasBlocks(*DEFAULT_BLOCKS)  # the config default is what is lowered here
  t, s, h, kvh, dqk, dv, extra = LOWER_CASES[case]
  extra = dict(extra)
  bias = extra.pop("bias", None)
  kind, thr, coef = bias(h) if bias else (None, (), jnp.zeros((1, h)))
  bq, bk, warps, stages = blocks
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731

  def fwd_bwd(q, k, v, coef):
    def f(q, k, v, coef):
      return flash_attention(q, k, v, bias_kind=kind, bias_thresholds=thr, bias_coef_nh=coef if kind else None,
                             block_q=bq, block_k=bk, num_warps=warps, num_stages=stages, interpret=False,
                             backend="gpu", **extra)
    o, vjp = jax.vjp(f, q, k, v, coef)
    return o, vjp(o)

  coef_sds = jax.ShapeDtypeStruct(coef.shape, jnp.float32)
  traced = jax.jit(fwd_bwd).trace(sds(1, t, h, dqk), sds(1, s, kvh, dqk), sds(1, s, kvh, dv), coef_sds)
  assert [x.shape for x in jax.tree.leaves(traced.out_info)] == [(1, t, h, dv), (1, t, h, dqk), (1, s, kvh, dqk),
                                                                 (1, s, kvh, dv), coef.shape]
  assert triton_h100(traced.lower(lowering_platforms=("cuda",)).as_text()) == 3
