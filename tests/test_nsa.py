"""NSA (models/attention/nsa.py) against independent numpy references: full causal attention, plain-loop block
geometry, one-hot values that reveal exactly which tokens each query attended to, and the module's causality."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.attention import nsa as nsa_config
from efficientllm_jax import config as config_lib
from efficientllm_jax.models.attention import ATTENTIONS, nsa
from efficientllm_jax.models.positional import PositionContext, RoPE

GEOM = dict(compress_block=8, compress_stride=4, select_block=8, local_blocks=1)


# ---------------------------------------------------------------------------------------------------------------
# numpy references

def np_softmax_masked(logits, mask):
  logits = np.where(mask, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(mask, np.exp(logits - m), 0.0)
  s = e.sum(-1, keepdims=True)
  return e / np.where(s > 0, s, 1.0)


def np_causal_attention(q, k, v, *, window=0, bias_hts=None):
  """q [B, T, H, D], k/v [B, S, K, D]; plain softmax with a causal (optionally windowed) mask."""
  t, h, d = q.shape[1:]
  g = h // k.shape[2]
  kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(d)
  if bias_hts is not None:
    logits = logits + bias_hts[None]
  i, j = np.arange(t)[:, None], np.arange(k.shape[1])[None, :]
  mask = j <= i
  if window:
    mask &= j > i - window
  return np.einsum("bhts,bshd->bthd", np_softmax_masked(logits, mask), vv)


def np_compressed_attention(q, kc, vc, ends, bias_hts=None):
  t, h, d = q.shape[1:]
  g = h // kc.shape[2]
  logits = np.einsum("bthd,bnhd->bhtn", q, np.repeat(kc, g, axis=2)) / math.sqrt(d)
  if bias_hts is not None:
    logits = logits + bias_hts[None]
  p = np_softmax_masked(logits, ends[None, :] <= np.arange(t)[:, None])
  return np.einsum("bhtn,bnhd->bthd", p, np.repeat(vc, g, axis=2)), p


def np_rope(x_bthd, theta, positions=None):
  t, d = x_bthd.shape[1], x_bthd.shape[-1]
  positions = np.arange(t) if positions is None else positions
  ang = positions[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x_bthd[..., : d // 2], x_bthd[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_linear(x, layer):
  w = np.asarray(layer.kernel[...], np.float64)
  y = np.tensordot(x, w, axes=([-1], [0]))
  return y + np.asarray(layer.bias[...], np.float64) if layer.bias is not None else y


def normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class LinearBias:
  """ALiBi-like logit bias, -slope_h * (i - j): the interface of PositionContext.bias."""

  def __init__(self, slopes):
    self.slopes = jnp.asarray(slopes, jnp.float32)

  def dense(self, q_pos, k_pos):
    dist = (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    return -self.slopes[:, None, None] * dist[None]


# ---------------------------------------------------------------------------------------------------------------
# geometry

def test_selection_weights_count_shared_strides():
  t, l, d, ls = 96, 32, 16, 64
  w = nsa.selection_weights(t, l, d, ls)
  nc, ns = (t - l) // d + 1, -(-t // ls)
  assert w.shape == (nc, ns)
  for i in range(nc):
    for j in range(ns):
      shared = sum(1 for p in range(i * d, i * d + l) if j * ls <= p < (j + 1) * ls)
      assert w[i, j] == shared / d
  # l' == l == d: each compressed block is exactly one selection block (p_slc = p_cmp, the paper's special case)
  np.testing.assert_array_equal(nsa.selection_weights(64, 16, 16, 16), np.eye(4, dtype=np.float32))


def test_compress_blocks_are_overlapping_windows():
  x = normal(0, (2, 40, 3, 5))
  blocks = np.asarray(nsa.compress_blocks(jnp.asarray(x), 16, 8))
  assert blocks.shape == (2, 4, 16, 3, 5)  # (40 - 16) // 8 + 1 blocks
  for i in range(4):
    np.testing.assert_array_equal(blocks[:, i], x[:, i * 8: i * 8 + 16])


# ---------------------------------------------------------------------------------------------------------------
# branches as pure functions

@functools.cache
def _jitted_branches(n, bias, local_blocks):
  geom = dict(GEOM, local_blocks=local_blocks)
  return jax.jit(lambda *a: nsa.sparse_branches(*a, num_selected=n, bias=bias, **geom))


def _branches(q, kc, vc, ends, ks, vs, *, n, bias=None, local_blocks=GEOM["local_blocks"]):
  return [np.asarray(o) for o in _jitted_branches(n, bias, local_blocks)(q, kc, vc, ends, ks, vs)]


def _inputs(t=64, b=2, kv=2, g=2, d=16, seed=0):
  nc = nsa.num_compressed(t, GEOM["compress_block"], GEOM["compress_stride"])
  ends = np.arange(nc) * GEOM["compress_stride"] + GEOM["compress_block"] - 1
  q = normal(seed, (b, t, kv * g, d))
  kc, vc = normal(seed + 1, (b, nc, kv, d)), normal(seed + 2, (b, nc, kv, d))
  ks, vs = normal(seed + 3, (b, t, kv, d)), normal(seed + 4, (b, t, kv, d))
  return q, kc, vc, ends, ks, vs


def test_compressed_branch_matches_numpy_and_sees_only_ended_blocks():
  q, kc, vc, ends, ks, vs = _inputs()
  o_cmp, _, _ = _branches(q, kc, vc, ends, ks, vs, n=3)
  ref, _ = np_compressed_attention(q, kc, vc, ends)
  np.testing.assert_allclose(o_cmp, ref, atol=2e-5)
  assert np.all(o_cmp[:, : GEOM["compress_block"] - 1] == 0)  # no block has ended yet: zeros, not NaN
  # one-hot compressed values reveal the attended compressed tokens: exactly the blocks ended at or before t
  t, nc = q.shape[1], kc.shape[1]
  onehot = np.broadcast_to(np.eye(nc, 16, dtype=np.float32)[None, :, None], vc.shape)
  o_cmp, _, _ = _branches(q, kc, onehot, ends, ks, vs, n=3)
  counts = nsa.attended_tokens(t, num_selected=3, window=8, **{k: GEOM[k] for k in
                                                                ("compress_block", "compress_stride", "select_block")})
  for ti in range(t):
    support = o_cmp[:, ti, :, :nc] > 0
    np.testing.assert_array_equal(support, np.broadcast_to(ends <= ti, support.shape))
    assert support[0, 0].sum() == counts["cmp"][ti]


def np_selection(q, kc, ends, t, *, n, select_block, local_blocks, compress_block, compress_stride):
  """Block ids per (b, kv, t) from group-summed compressed probabilities; None where the n-th place is a tie."""
  kv = kc.shape[2]
  _, p = np_compressed_attention(q, kc, np.zeros_like(kc), ends)  # [B, H, T, Nc]
  p = p.reshape(p.shape[0], kv, -1, *p.shape[2:]).sum(2)  # [B, K, T, Nc]
  ns = -(-t // select_block)
  w = np.zeros((len(ends), ns))
  for i in range(len(ends)):
    for p_tok in range(i * compress_stride, i * compress_stride + compress_block):
      w[i, p_tok // select_block] += 1 / compress_stride
  score = p @ w
  sel = {}
  for bi in range(score.shape[0]):
    for ki in range(kv):
      for ti in range(t):
        cur = ti // select_block
        s = [(math.inf if (j == 0 or cur - local_blocks < j <= cur) else score[bi, ki, ti, j], j)
             for j in range(cur + 1)]
        s.sort(key=lambda x: -x[0])
        tie = len(s) > n and s[n - 1][0] == s[n][0]
        sel[bi, ki, ti] = None if tie else {j for _, j in s[:n]}
  return sel


@pytest.mark.parametrize("n, local_blocks", [(3, 1), (4, 2)])
def test_selected_branch_attends_exactly_the_groups_top_blocks(n, local_blocks):
  t, d = 64, 64
  q, kc, vc, ends, ks, _ = _inputs(t=t, d=d)
  b, kv, h = q.shape[0], ks.shape[2], q.shape[2]
  g = h // kv
  onehot = np.broadcast_to(np.eye(t, d, dtype=np.float32)[None, :, None], (b, t, kv, d))  # v of token p = e_p
  _, o_slc, idx = _branches(q, kc, vc, ends, ks, onehot, n=n, local_blocks=local_blocks)
  ref = np_selection(q, kc, ends, t, n=n, **dict(GEOM, local_blocks=local_blocks))
  counts = nsa.attended_tokens(t, num_selected=n, window=8, **{k: GEOM[k] for k in
                                                                ("compress_block", "compress_stride", "select_block")})
  lb = GEOM["select_block"]
  checked = 0
  for bi in range(b):
    for ki in range(kv):
      for ti in range(t):
        support = o_slc[bi, ti, ki * g:(ki + 1) * g] > 0  # [G, T]
        for gi in range(1, g):  # the group shares one selection
          np.testing.assert_array_equal(support[gi], support[0])
        tokens = set(np.flatnonzero(support[0]).tolist())
        blocks = {p // lb for p in tokens}
        forced = {0} | {j for j in range(ti // lb - local_blocks + 1, ti // lb + 1) if j >= 0}
        assert max(tokens) == ti and forced <= blocks  # causal; first and local blocks always taken
        assert tokens == {p for blk in blocks for p in range(blk * lb, min((blk + 1) * lb, ti + 1))}
        assert len(tokens) == counts["slc"][ti]
        assert blocks == {j for j in idx[bi, ki, ti] if j >= 0}
        if ref[bi, ki, ti] is not None:
          assert blocks == ref[bi, ki, ti], (bi, ki, ti)
          checked += 1
  assert checked > b * kv * t // 2  # ties are rare; most queries are checked against the reference


def test_all_blocks_selected_equals_full_causal_attention():
  q, kc, vc, ends, ks, vs = _inputs(t=60)  # 60 = 7.5 selection blocks: the last one is partial
  _, o_slc, _ = _branches(q, kc, vc, ends, ks, vs, n=8)
  np.testing.assert_allclose(o_slc, np_causal_attention(q, ks, vs), atol=2e-5)


def test_logit_bias_applies_in_compressed_and_selected_branches():
  q, kc, vc, ends, ks, vs = _inputs(t=48)
  slopes = np.array([0.5, 0.25, 0.125, 0.0625])
  bias = LinearBias(slopes)
  o_cmp, o_slc, _ = _branches(q, kc, vc, ends, ks, vs, n=6, bias=bias)
  dist = np.arange(48)[:, None] - np.arange(48)[None, :]
  np.testing.assert_allclose(o_slc, np_causal_attention(q, ks, vs, bias_hts=-slopes[:, None, None] * dist),
                             atol=2e-5)
  dist_c = np.arange(48)[:, None] - ends[None, :]
  ref, _ = np_compressed_attention(q, kc, vc, ends, bias_hts=-slopes[:, None, None] * dist_c)
  np.testing.assert_allclose(o_cmp, ref, atol=2e-5)


def test_query_chunks_give_the_same_values_and_gradients():
  q, kc, vc, ends, ks, vs = _inputs(t=64)
  cot = normal(9, q.shape)

  def loss(chunk):
    def f(q, kc, vc, ks, vs):
      o_cmp, o_slc, _ = nsa.sparse_branches(q, kc, vc, ends, ks, vs, num_selected=3, query_chunk=chunk, **GEOM)
      return jnp.sum((o_cmp + 2 * o_slc) * cot)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(q, kc, vc, ks, vs)

  (v1, g1), (v2, g2) = loss(0), loss(16)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_selection_is_not_differentiable():
  """Compressed keys reach the selected branch only through top-k: no gradient flows that way (paper, Sec. 3)."""
  q, kc, vc, ends, ks, vs = _inputs(t=64)
  f = lambda kc: jnp.sum(nsa.sparse_branches(q, kc, vc, ends, ks, vs, num_selected=3, **GEOM)[1])
  assert np.all(np.asarray(jax.jit(jax.grad(f))(kc)) == 0)


def test_attended_token_counts_by_plain_loop():
  t, l, d, ls, n, w = 300, 32, 16, 64, 3, 100
  c = nsa.attended_tokens(t, compress_block=l, compress_stride=d, select_block=ls, num_selected=n, window=w)
  for ti in range(t):
    assert c["cmp"][ti] == sum(1 for i in range(t) if i * d + l - 1 <= ti)
    assert c["win"][ti] == sum(1 for j in range(t) if ti - w < j <= ti)
    blocks = min(n, ti // ls + 1)  # current block + (blocks - 1) earlier full ones
    assert c["slc"][ti] == sum(1 for j in range(ti + 1) if j // ls >= ti // ls or j // ls < blocks - 1)


# ---------------------------------------------------------------------------------------------------------------
# the module

def _tiny(**nsa_overrides):
  cfg = nsa_config.get_config("tiny")
  cfg.attention.nsa.update(nsa_overrides)
  cfg.attention.impl = "xla"
  return cfg


def _module_and_ctx(cfg, t, seed=0):
  module = ATTENTIONS["nsa"](cfg, rngs=nnx.Rngs(seed))
  x = normal(seed + 100, (2, t, cfg.model.hidden))
  ctx = RoPE(cfg, rngs=nnx.Rngs(0)).context(jnp.broadcast_to(jnp.arange(t), (2, t)))
  return module, jnp.asarray(x), ctx


def _force_gates(module, on: str, heads: int):
  module.gate.kernel[...] = jnp.zeros_like(module.gate.kernel[...])
  logits = np.full((heads, 3), -1e4, np.float32)
  logits[:, nsa.BRANCHES.index(on)] = 1e4  # sigmoid: exactly 0 / 1 in fp32
  module.gate.bias[...] = jnp.asarray(logits)


def _np_full_causal_module(module, x, k_layer, v_layer, theta):
  x = np.asarray(x, np.float64)
  q = np_rope(np_linear(x, module.q), theta)
  k = np_rope(np_linear(x, k_layer), theta)
  v = np_linear(x, v_layer)
  o = np_causal_attention(q, k, v)
  wo = np.asarray(module.o.kernel[...], np.float64)
  return np.einsum("bthd,hde->bte", o, wo)


@pytest.mark.parametrize("branch", ["win", "slc"])
def test_module_reduces_to_full_causal_attention_through_one_gate(branch):
  t = 64  # tiny: 4 selection blocks of 16 <= n = 4; window 64 >= T
  cfg = _tiny(window=t)
  module, x, ctx = _module_and_ctx(cfg, t)
  _force_gates(module, branch, cfg.model.num_heads)
  y = np.asarray(nnx.jit(lambda m, x, ctx: m(x, ctx))(module, x, ctx))
  layers = {"win": (module.k_win, module.v_win), "slc": (module.k_slc, module.v_slc)}[branch]
  ref = _np_full_causal_module(module, x, *layers, cfg.position.rope_theta)
  np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)


def test_module_is_causal_in_values_and_gradients():
  t, s = 64, 37  # perturb from inside a selection block and a compression block
  cfg = _tiny(num_selected=3)
  module, x, ctx = _module_and_ctx(cfg, t)
  x2 = x.at[:, s:].add(jnp.asarray(normal(5, (2, t - s, cfg.model.hidden))))
  f = nnx.jit(lambda m, x: m(x, ctx))
  y1, y2 = np.asarray(f(module, x)), np.asarray(f(module, x2))
  np.testing.assert_allclose(y1[:, :s], y2[:, :s], atol=1e-6)
  assert np.abs(y1[:, s:] - y2[:, s:]).max() > 1e-3
  cot = jnp.asarray(normal(6, y1.shape)).at[:, s:].set(0)
  grad = np.asarray(nnx.jit(jax.grad(lambda x, m: jnp.sum(m(x, ctx) * cot)))(x, module))
  assert np.all(grad[:, s:] == 0)
  assert np.abs(grad[:, :s]).max() > 0


def test_compressed_keys_are_rotated_at_their_block_end():
  t = 64
  cfg = _tiny()
  module, x, ctx = _module_and_ctx(cfg, t)
  module.phi_k.w2[...] = module.phi_k.w2[...] * 300  # large compressed keys: positions change the logits a lot
  module.phi_v.w2[...] = module.phi_v.w2[...] * 300  # and values of order one
  rope = RoPE(cfg, rngs=nnx.Rngs(0))
  run = nnx.jit(lambda m, x, ctx: m.branches(x, ctx)[0]["cmp"])
  o_cmp = np.asarray(run(module, x, ctx))
  # reference: phi's (unrotated) output rotated in numpy at position i*d + l - 1, the block's last token
  kc, vc, _ = (np.asarray(a, np.float64) for a in module.compressed_kv(x, PositionContext()))
  l, d = cfg.attention.nsa.compress_block, cfg.attention.nsa.compress_stride
  ends = np.arange(kc.shape[1]) * d + l - 1
  theta = cfg.position.rope_theta
  q = np_rope(np_linear(np.asarray(x, np.float64), module.q), theta)
  ref, p = np_compressed_attention(q, np_rope(kc, theta, ends), vc, ends)
  assert p[:, :, -1].max() > 2 / p.shape[-1]  # far from uniform: positions matter
  np.testing.assert_allclose(o_cmp, ref, atol=1e-4)
  for wrong in (ends - l + 1, np.zeros_like(ends)):  # block start (another implementation's choice) or unrotated
    assert np.abs(np_compressed_attention(q, np_rope(kc, theta, wrong), vc, ends)[0] - o_cmp).max() > 5e-2
  # the same sequence shifted by 1000 positions attends identically (relative positions only)
  shifted = run(module, x, rope.context(jnp.broadcast_to(jnp.arange(t) + 1000, (2, t))))
  np.testing.assert_allclose(np.asarray(shifted), o_cmp, atol=2e-3)


def test_param_count_matches_the_formula():
  cfg = nsa_config.get_config("0.5B")
  d, h, kv, hd, l = 896, 14, 2, 64, 64
  proj = lambda out: d * out + out  # kernel + bias
  phi = l * kv * hd + kv * (l * hd * hd + hd + hd * hd + hd)  # position embedding + two layers per kv head
  expected = proj(h * hd) + 6 * proj(kv * hd) + 2 * phi + proj(3 * h) + h * hd * d
  assert nsa.param_count(cfg) == expected


# ---------------------------------------------------------------------------------------------------------------
# configs

def test_presets():
  for size, mb in (("0.5B", 4), ("1.5B", 2), ("3B", 1)):
    c = config_lib.validate(nsa_config.get_config(size))
    assert (c.attention.kind, c.train.micro_batch, c.data.seq_len) == ("nsa", mb, 8192)
    a = c.attention.nsa
    assert (a.compress_block, a.compress_stride, a.select_block, a.num_selected, a.window) == (64, 32, 64, 4, 128)
    p = config_lib.validate(nsa_config.get_config(f"{size},paper")).attention.nsa
    assert (p.compress_block, p.compress_stride, p.select_block, p.num_selected, p.window) == (32, 16, 64, 16, 512)
  config_lib.validate(nsa_config.get_config("tiny"))
  with pytest.raises(ValueError, match="use SIZE or SIZE,paper"):
    nsa_config.get_config("1.5B,fast")


@pytest.mark.parametrize("overrides, message", [
    (dict(compress_block=48), "compress_block=48 is not a multiple of attention.nsa.compress_stride=32"),
    (dict(compress_stride=128), "compress_stride=128 exceeds attention.nsa.compress_block=64"),
    (dict(select_block=80), "select_block=80 is not a multiple of attention.nsa.compress_stride=32"),
    (dict(num_selected=2), "num_selected=2 cannot hold the first block plus attention.nsa.local_blocks=2"),
    (dict(window=0), r"attention.nsa.window=0 must be a positive integer"),
    (dict(local_blocks=0), r"attention.nsa.local_blocks=0 must be a positive integer"),
    (dict(query_chunk=-1), r"attention.nsa.query_chunk=-1 must be a number >= 0"),
    (dict(impl="triton"), r"attention.nsa.impl='triton' is not known: use one of auto, reference, pallas"),
    (dict(impl="pallas", select_block=96), "attention.nsa.select_block=96 must be a power of two"),
])
def test_validation_messages(overrides, message):
  c = nsa_config.get_config("0.5B")
  c.attention.nsa.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_validation_of_window_and_sequence():
  c = nsa_config.get_config("0.5B")
  c.attention.window = 256
  with pytest.raises(config_lib.ConfigError, match="NSA's window is attention.nsa.window"):
    config_lib.validate(c)
  c = nsa_config.get_config("0.5B")
  c.data.seq_len = 32
  with pytest.raises(config_lib.ConfigError, match="data.seq_len=32 is shorter than one NSA block"):
    config_lib.validate(c)


# ---------------------------------------------------------------------------------------------------------------
# training

@pytest.mark.slow
def test_tiny_nsa_trains_with_falling_loss(tmp_path):
  from efficientllm_jax.train.loop import train_and_evaluate
  c = nsa_config.get_config("tiny")
  c.train.steps, c.train.warmup_steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 15, 5, 1, 0, 1
  c.train.micro_batch, c.data.seq_len = 4, 64
  c.data.tokenizer, c.data.max_corpus_mb = "bytes", 2.0  # no BPE to train on a cold cache
  summary = train_and_evaluate(c, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  assert summary["attention"] == "nsa" and math.isfinite(summary["eval_loss"])
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (cuDNN window branch, bf16)")
def test_layer_memory_at_8k_is_bounded_on_gpu():
  """One 0.5B NSA layer, micro-batch 4 x 8192 tokens, forward + backward: no [T, T] buffer (that alone would be
  4 * 14 * 8192^2 * 4 bytes = 15 GB)."""
  cfg = nsa_config.get_config("0.5B")
  b, t = cfg.train.micro_batch, cfg.data.seq_len
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ATTENTIONS["nsa"](cfg, rngs=nnx.Rngs(0))))
  rope = RoPE(cfg, rngs=nnx.Rngs(0))

  def loss(state, x):
    ctx = rope.context(jnp.broadcast_to(jnp.arange(t), (b, t)))
    return jnp.sum(nnx.merge(graphdef, state)(x, ctx).astype(jnp.float32))

  x = jax.ShapeDtypeStruct((b, t, cfg.model.hidden), jnp.bfloat16)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 8e9
