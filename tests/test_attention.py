"""Attention core and the MHA / GQA / MQA module against independent references (numpy loops, weight copies)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from efficientllm_jax import config as config_lib
from efficientllm_jax.models.attention import make_attention, ops
from efficientllm_jax.models.positional import make_position, rotate

from tests.conftest import load_config_file, train_config_file


def load_config(kind: str, size: str = "tiny", **overrides):
  return config_lib.validate(load_config_file(f"configs/attention/{kind}.py", size, **overrides))


# ------------------------------------------------------------------------------------------ numpy reference
def numpy_attention(q, k, v, scale, window=0, bias_fn=None, q_offset=0):
  """Plain loops over batch, head and query: softmax over the visible keys only, float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, _ = q.shape
  s, kvh = k.shape[1], k.shape[2]
  out = np.zeros((b, t, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      kv = hi // (h // kvh)
      for i in range(t):
        pos = q_offset + i
        lo = max(0, pos - window + 1) if window else 0
        js = np.arange(lo, min(pos, s - 1) + 1)
        logits = np.array([q[bi, i, hi] @ k[bi, j, kv] * scale for j in js])
        if bias_fn is not None:
          logits = logits + np.array([bias_fn(hi, pos, j) for j in js])
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, js, kv]
  return out


@struct.dataclass
class SlopeBias:
  """A logit-bias object as the position schemes make: -slope_h * (i - j) + offset_h."""
  slopes: jax.Array
  offsets: jax.Array

  def dense(self, q_pos, k_pos):
    dist = (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    return -self.slopes[:, None, None] * dist + self.offsets[:, None, None]


def _normal(seed, *shape):
  """Test inputs from numpy's RNG (no jax.random compile per shape)."""
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _qkv(seed, b, t, h, kvh, d, dv, s=None):
  s = s or t
  return _normal(seed, b, t, h, d), _normal(seed + 1, b, s, kvh, d), _normal(seed + 2, b, s, kvh, dv)


def _xla(**kw):
  return jax.jit(lambda q, k, v: ops.xla_attention(q, k, v, **kw))


@pytest.mark.parametrize("t,h,kvh,d,dv,window,block_q", [
    (13, 4, 2, 8, 8, 0, 512),  # one block, GQA
    (13, 4, 2, 8, 8, 0, 4),  # chunked, odd length (13 = 3 blocks of 4 + 1)
    (13, 4, 4, 8, 6, 5, 4),  # chunked + window (span 8 < 13: sliced keys), MHA, dv != d
    (11, 3, 1, 6, 6, 3, 512),  # window, MQA, one block
    (17, 4, 1, 8, 8, 20, 5),  # window longer than the sequence, chunked
])
def test_xla_matches_numpy(t, h, kvh, d, dv, window, block_q):
  q, k, v = _qkv(t * 7 + window, 2, t, h, kvh, d, dv)
  out = _xla(scale=0.37, window=window, block_q=block_q)(q, k, v)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.37, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window,block_q", [(0, 512), (0, 4), (4, 3)])
def test_xla_bias_per_block_matches_numpy(window, block_q):
  h = 4
  q, k, v = _qkv(3, 1, 10, h, 2, 8, 8)
  slopes, offsets = np.array([0.5, 0.25, 0.1, 0.0]), np.array([0.3, -0.2, 0.0, 1.0])
  bias = SlopeBias(jnp.asarray(slopes, jnp.float32), jnp.asarray(offsets, jnp.float32))
  out = jax.jit(lambda q, k, v, bias: ops.xla_attention(q, k, v, scale=0.3, bias=bias, window=window,
                                                         block_q=block_q))(q, k, v, bias)
  ref = numpy_attention(q, k, v, 0.3, window, bias_fn=lambda hi, i, j: -slopes[hi] * (i - j) + offsets[hi])
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window,block_q", [(0, 3), (3, 2)])
def test_xla_query_offset_matches_numpy(window, block_q):
  q, k, v = _qkv(5, 1, 7, 2, 1, 8, 8, s=12)  # 7 queries at positions 5..11 over 12 keys
  out = _xla(scale=0.35, window=window, q_offset=5, block_q=block_q)(q, k, v)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.35, window, q_offset=5), atol=2e-5, rtol=2e-5)


def test_chunked_gradients_match_unchunked():
  q, k, v = _qkv(9, 1, 19, 4, 2, 8, 8)
  w = _normal(1, 1, 19, 4, 8)
  loss = lambda bq, win: lambda q, k, v: jnp.sum(ops.xla_attention(q, k, v, scale=0.3, window=win, block_q=bq) * w)
  grads = jax.jit(lambda *a: [jax.grad(loss(bq, win), argnums=(0, 1, 2))(*a) for win in (0, 5) for bq in (512, 4)])
  g0_full, g0_chunk, g5_full, g5_chunk = grads(q, k, v)
  for a, b in zip(g0_full + g5_full, g0_chunk + g5_chunk):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_path_never_builds_full_logits():
  """At T = S = 2048 with 256-query blocks no [.., 2048, 2048] array appears in the jaxpr (forward or grad)."""
  q, k, v = (jax.ShapeDtypeStruct((1, 2048, 2, 16), jnp.float32) for _ in range(3))
  f = lambda q, k, v: jnp.sum(ops.xla_attention(q, k, v, scale=0.25, block_q=256))
  text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))
  assert "2048,2048" not in text.replace(" ", "")
  assert "256,2048" in text.replace(" ", "")  # the per-block logits


def test_cudnn_on_cpu_is_refused_with_reason():
  q, k, v = _qkv(0, 1, 8, 2, 2, 8, 8)
  if jax.default_backend() == "gpu":
    pytest.skip("CPU behaviour")
  with pytest.raises(config_lib.ConfigError, match="attention.impl='cudnn' cannot run this call: platform is cpu"):
    ops.attention(q, k, v, impl="cudnn")
  np.testing.assert_allclose(ops.attention(q, k, v, impl="auto"), numpy_attention(q, k, v, 8 ** -0.5), atol=2e-5)


def test_cudnn_supports_head_dim_limits(monkeypatch):
  """jax 0.11's check_is_flash_attention: multiple of 8, <= 256 from compute capability 9.0, <= 128 before."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  for cc, d, dv, ok in [((9, 0), 192, 128, True), ((9, 0), 256, 256, True), ((9, 0), 264, 264, False),
                        ((9, 0), 60, 60, False), ((8, 0), 192, 128, False), ((8, 0), 128, 64, True)]:
    monkeypatch.setattr(ops, "_compute_capability", lambda cc=cc: cc)
    reason = ops.cudnn_supports(bf(1, 8, 2, d), bf(1, 8, 2, d), bf(1, 8, 2, dv), None)
    assert (reason is None) == ok, (cc, d, dv, reason)
  monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
  f32 = jax.ShapeDtypeStruct((1, 8, 2, 64), jnp.float32)
  assert "bf16 or fp16" in ops.cudnn_supports(f32, f32, f32, None)
  assert "logit bias" in ops.cudnn_supports(bf(1, 8, 2, 64), bf(1, 8, 2, 64), bf(1, 8, 2, 64), object())


# ------------------------------------------------------------------------------------------ MHA / GQA / MQA
def _module(cfg, seed=0):
  return make_attention(cfg, rngs=nnx.Rngs(seed))


def _ctx(cfg, b, t):
  pos = make_position(cfg, rngs=nnx.Rngs(0))
  return pos.context(jnp.broadcast_to(jnp.arange(t), (b, t)))


def _randomize_biases(module, seed):
  """Spine initialises biases to zero; random ones make the weight-copy checks cover them too."""
  for i, proj in enumerate((module.q, module.k, module.v)):
    proj.bias[...] = 0.1 * _normal(seed + i, *proj.bias.shape)


def _expand_kv(src, dst):
  """Copies src's weights into dst, whose K/V heads are src's repeated per query group (head h -> h // g)."""
  g = dst.k.kernel.shape[1] // src.k.kernel.shape[1]
  dst.q.kernel[...], dst.q.bias[...], dst.o.kernel[...] = src.q.kernel[...], src.q.bias[...], src.o.kernel[...]
  for name in ("k", "v"):
    s, d = getattr(src, name), getattr(dst, name)
    d.kernel[...] = jnp.repeat(s.kernel[...], g, axis=1)
    d.bias[...] = jnp.repeat(s.bias[...], g, axis=0)


@pytest.mark.parametrize("src_kind,kv", [("mqa", 1), ("gqa", 2), ("gqa", 4)])
def test_grouped_kv_equals_mha_with_repeated_kv(src_kind, kv):
  """MQA / GQA equal MHA whose K/V heads are copies of the shared ones (kv = heads: GQA is MHA)."""
  src_cfg = load_config(src_kind, **{"model.num_kv_heads": kv})
  mha_cfg = load_config("mha")
  src, mha = _module(src_cfg), _module(mha_cfg, seed=1)
  _randomize_biases(src, 10)
  _expand_kv(src, mha)
  x = _normal(2, 2, 12, src_cfg.model.hidden)
  ctx = _ctx(src_cfg, 2, 12)
  np.testing.assert_allclose(_jit_apply(src, ctx)(x), _jit_apply(mha, ctx)(x), atol=1e-5, rtol=1e-5)


def test_mqa_equals_gqa_with_one_kv_head():
  mqa_cfg, gqa_cfg = load_config("mqa"), load_config("gqa", **{"model.num_kv_heads": 1})
  mqa, gqa = _module(mqa_cfg), _module(gqa_cfg, seed=3)
  _randomize_biases(mqa, 20)
  nnx.update(gqa, nnx.state(mqa))
  x = _normal(4, 2, 10, mqa_cfg.model.hidden)
  ctx = _ctx(mqa_cfg, 2, 10)
  out = _jit_apply(mqa, ctx)(x)
  np.testing.assert_allclose(out, _jit_apply(gqa, ctx)(x), atol=1e-6)
  # and both equal the numpy reference built from the same projections
  q, k, v = rotate(mqa.q(x), ctx), rotate(mqa.k(x), ctx), mqa.v(x)
  ref = numpy_attention(q, k, v, mqa_cfg.model.head_dim ** -0.5)
  ref_out = np.einsum("bthd,hdo->bto", ref, np.asarray(mqa.o.kernel[...], np.float64))
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)


def _jit_apply(module, ctx):
  return jax.jit(lambda x: module(x, ctx))


def causality_check(module, ctx, x, p: int, atol: float = 1e-6):
  """Perturbing tokens >= p changes neither outputs < p nor the gradient of outputs < p w.r.t. the input, and
  that gradient is zero on tokens >= p."""
  w = _normal(7, *x.shape[:2], module.o.kernel.shape[-1])
  x2 = x.at[:, p:].add(3.0 * _normal(8, *x[:, p:].shape))

  @jax.jit
  def run(x, x2):
    early = lambda x: jnp.sum(module(x, ctx)[:, :p] * w[:, :p])
    return module(x, ctx), module(x2, ctx), jax.grad(early)(x), jax.grad(early)(x2)

  out, out2, g, g2 = run(x, x2)
  np.testing.assert_allclose(out[:, :p], out2[:, :p], atol=atol)
  assert not np.allclose(out[:, p:], out2[:, p:], atol=1e-3)  # the perturbation is real
  np.testing.assert_allclose(g, g2, atol=atol)
  assert np.all(np.asarray(g[:, p:]) == 0) and np.abs(np.asarray(g[:, :p])).max() > 0


@pytest.mark.parametrize("kind,window,block_q", [
    ("mha", 0, None), ("gqa", 0, None), ("mqa", 0, None), ("mla", 0, None),
    ("gqa", 4, 3), ("mla", 4, 3),  # sliding window through the chunked path (odd length 11 = 3 blocks of 3 + 2)
])
def test_every_kind_is_causal(kind, window, block_q, monkeypatch):
  if block_q:
    monkeypatch.setattr(ops, "XLA_BLOCK_Q", block_q)
  cfg = load_config(kind, **{"attention.window": window})
  module = _module(cfg)
  x = _normal(5, 2, 11, cfg.model.hidden)
  causality_check(module, _ctx(cfg, 2, 11), x, p=6)


# ------------------------------------------------------------------------------------------ GPU: cuDNN vs XLA
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("h,kvh,d,dv,window", [
    (14, 2, 64, 64, 0), (12, 2, 128, 128, 0), (12, 1, 128, 128, 0), (12, 12, 128, 128, 128),
    (12, 12, 192, 128, 0),  # MLA at 1.5B: qk 128 + 64, v 128 (v padded to 192)
    (14, 14, 128, 64, 0),  # MLA at 0.5B
])
def test_cudnn_matches_xla(h, kvh, d, dv, window):
  q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(0, 2, 1024, h, kvh, d, dv))
  scale = 1 / np.sqrt(d)
  assert ops.cudnn_supports(q, k, v, None) is None
  f = lambda impl: lambda q, k, v: ops.attention(q, k, v, impl=impl, scale=scale, window=window, block_q=256)
  out_c, out_x = jax.jit(f("cudnn"))(q, k, v), jax.jit(f("xla"))(q, k, v)
  np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2, rtol=2e-2)
  w = _normal(1, *out_x.shape).astype(jnp.bfloat16)
  grads = {impl: jax.jit(jax.grad(lambda *a, impl=impl: jnp.sum(f(impl)(*a).astype(jnp.float32) * w),
                                  argnums=(0, 1, 2)))(q, k, v) for impl in ("cudnn", "xla")}
  for gc, gx in zip(grads["cudnn"], grads["xla"]):
    gc, gx = np.asarray(gc, np.float32), np.asarray(gx, np.float32)
    assert np.abs(gc - gx).max() <= 3e-2 * max(1.0, np.abs(gx).max()), (np.abs(gc - gx).max(), np.abs(gx).max())


# ------------------------------------------------------------------------------------------ configs and training
@pytest.mark.parametrize("kind,kv", [("mha", {"tiny": 4, "0.5B": 14, "1.5B": 12}), ("gqa", {"tiny": 2, "0.5B": 2, "1.5B": 2}),
                                     ("mqa", {"tiny": 1, "0.5B": 1, "1.5B": 1})])
def test_configs_set_kind_and_kv_heads(kind, kv):
  for size, n in kv.items():
    cfg = load_config(kind, size)
    assert (cfg.attention.kind, cfg.model.num_kv_heads) == (kind, n)
  big = load_config(kind, "1.5B")
  assert (big.data.seq_len, big.train.micro_batch, load_config(kind, "0.5B").train.micro_batch,
          load_config(kind, "3B").train.micro_batch) == (8192, 2, 4, 1)


def test_mqa_with_two_kv_heads_is_rejected():
  with pytest.raises(config_lib.ConfigError, match=r"attention.kind='mqa' needs model.num_kv_heads=1 \(got 2\)"):
    load_config("mqa", **{"model.num_kv_heads": 2})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_tiny_trains_with_falling_loss(kind, tmp_path):
  """configs/attention/<kind>.py:tiny trains end to end (12 steps of 4 x 64 tokens): the loss falls.

  One run per attention module. MHA and MQA are gqa.py with num_kv_heads = num_heads or 1: their config files are
  checked in test_configs_set_kind_and_kv_heads, and their outputs equal MHA's with repeated K/V heads
  (test_grouped_kv_equals_mha_with_repeated_kv, test_mqa_equals_gqa_with_one_kv_head); test_bench_e2e trains an MQA
  tiny through `python -m launch`. GQA tiny is RoPE tiny (test_positional_e2e), so RoPE's checks run here too."""
  summary, rows = train_config_file(f"configs/attention/{kind}.py", tmp_path)
  assert summary["attention"] == kind
  assert summary["final_loss"] < summary["first_loss"] - 0.5, summary
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


def test_auto_on_gpu_sends_biases_to_the_flash_kernel(monkeypatch):
  """The dispatch alone (no GPU needed): with the backend reported as GPU, auto picks the flash kernel for ALiBi
  and T5 (both measured faster there than xla; cuDNN takes no bias); an explicit impl stands."""
  from efficientllm_jax.models import positional
  from efficientllm_jax.models.attention import ops as ops_lib
  taken = []
  monkeypatch.setattr(ops_lib.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ops_lib, "pallas_attention", lambda *a, **k: taken.append("pallas") or "pallas")
  monkeypatch.setattr(ops_lib, "xla_attention", lambda *a, **k: taken.append("xla") or "xla")
  q = jnp.ones((1, 8, 4, 16), jnp.bfloat16)
  kv = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
  alibi = positional.ALiBiBias(jnp.asarray(positional.alibi_slopes(4), jnp.float32))
  t5 = positional.T5Bias(jnp.ones((32, 4), jnp.float32), 32, 128)
  ops_lib.attention(q, kv, kv, impl="auto", bias=alibi)
  ops_lib.attention(q, kv, kv, impl="auto", bias=t5)
  ops_lib.attention(q, kv, kv, impl="xla", bias=alibi)
  assert taken == ["pallas", "pallas", "xla"]
