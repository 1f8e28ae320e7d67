"""MLA (DeepSeek-V2): the training path against a numpy transcription of the paper's equations, the absorbed
latent-cache decode against the training path token by token, the cache size, parameter counts, config checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from efficientllm_jax import config as config_lib
from efficientllm_jax.models.attention import mla as mla_lib
from efficientllm_jax.models.positional import PositionContext, make_position
from efficientllm_jax.models.transformer import Transformer, param_counts

from tests.conftest import load_config_file



def load_config(kind: str = "mla", size: str = "tiny", **overrides):
  return config_lib.validate(load_config_file(f"configs/attention/{kind}.py", size, **overrides))


def _normal(seed, *shape, scale=1.0):
  return jnp.asarray(scale * np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _mla(cfg, seed=0):
  """An MLA module with random RMSNorm scales (init is all ones), so the norms' weights are checked too."""
  m = mla_lib.MLA(cfg, rngs=nnx.Rngs(seed))
  m.kv_norm.scale[...] = 1.0 + _normal(seed + 50, *m.kv_norm.scale.shape, scale=0.3)
  if m.dq:
    m.q_norm.scale[...] = 1.0 + _normal(seed + 51, *m.q_norm.scale.shape, scale=0.3)
  return m


def _ctx(cfg, t, start=0, b=2):
  pos = make_position(cfg, rngs=nnx.Rngs(0))
  return pos.context(jnp.broadcast_to(start + jnp.arange(t), (b, t)))


# ------------------------------------------------------------------------------------------ numpy reference
def np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, theta):
  """RoPE on the last axis of x [B, T, ..., r] at positions 0..T-1, half-split pairs (i, i + r/2)."""
  r = x.shape[-1]
  inv = theta ** (-np.arange(0, r, 2) / r)
  ang = np.arange(x.shape[1])[:, None] * inv  # [T, r/2]
  ang = ang.reshape((1, x.shape[1]) + (1,) * (x.ndim - 3) + (r // 2,))
  x1, x2 = x[..., : r // 2], x[..., r // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def np_mla(m, x, cfg, rope=True, window=0, bias_fn=None):
  """DeepSeek-V2 eq. (9)-(19) written out per head with loops over queries, float64."""
  P = lambda a: np.asarray(a, np.float64)
  x = P(x)
  eps, theta = cfg.model.rms_eps, cfg.position.rope_theta
  rot = (lambda a: np_rope(a, theta)) if rope else (lambda a: a)
  c_kv = np_rmsnorm(x @ P(m.kv_down.kernel[...]), P(m.kv_norm.scale[...]), eps)  # [B, T, dc]
  k_nope = np.einsum("btc,chn->bthn", c_kv, P(m.k_up.kernel[...]))
  v = np.einsum("btc,chv->bthv", c_kv, P(m.v_up.kernel[...]))
  k_rope = rot(x @ P(m.k_rope.kernel[...]))  # [B, T, dr], one key for all heads
  c_q = np_rmsnorm(x @ P(m.q_down.kernel[...]), P(m.q_norm.scale[...]), eps) if m.dq else x
  q = np.einsum("bti,ihe->bthe", c_q, P(m.q.kernel[...]))
  q_nope, q_rope = q[..., :m.dn], rot(q[..., m.dn:])
  b, t, h = q.shape[:3]
  out = np.zeros((b, t, h, m.dv))
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        js = np.arange(max(0, i - window + 1) if window else 0, i + 1)
        logits = np.array([(q_nope[bi, i, hi] @ k_nope[bi, j, hi] + q_rope[bi, i, hi] @ k_rope[bi, j])
                           / np.sqrt(m.dn + m.dr) for j in js])
        if bias_fn is not None:
          logits = logits + np.array([bias_fn(hi, i, j) for j in js])
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, js, hi]
  return np.einsum("bthv,hvd->btd", out, P(m.o.kernel[...]))


@struct.dataclass
class SlopeBias:
  slopes: jax.Array

  def dense(self, q_pos, k_pos):
    return -self.slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)


SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])  # tiny has 4 heads


@pytest.mark.parametrize("overrides,rope,bias", [
    ({}, True, False),  # suite setting: no query compression
    ({"attention.mla.q_lora_rank": 24}, True, False),  # DeepSeek-V2 style query compression
    ({"attention.window": 5, "attention.mla.qk_nope_head_dim": 16, "attention.mla.v_head_dim": 24}, True, False),
    ({"position.kind": "none"}, False, True),  # no rotation; a logit bias passes through
])
def test_training_path_matches_paper_equations(overrides, rope, bias):
  cfg = load_config(**overrides)
  m = _mla(cfg)
  x = _normal(1, 2, 9, cfg.model.hidden)
  ctx = _ctx(cfg, 9)
  if bias:
    ctx = ctx.replace(bias=SlopeBias(jnp.asarray(SLOPES, jnp.float32)))
  out = jax.jit(lambda x: m(x, ctx))(x)
  ref = np_mla(m, x, cfg, rope=rope, window=cfg.attention.window,
               bias_fn=(lambda hi, i, j: -SLOPES[hi] * (i - j)) if bias else None)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-4)


# ------------------------------------------------------------------------------------------ absorbed decode
@pytest.mark.parametrize("overrides,bias", [
    ({}, False),
    ({"attention.mla.q_lora_rank": 24, "attention.window": 4}, False),
    ({"position.kind": "none"}, True),
])
def test_absorbed_decode_equals_training_token_by_token(overrides, bias):
  cfg = load_config(**overrides)
  m = _mla(cfg)
  t = 10
  x = _normal(2, 2, t, cfg.model.hidden)
  extra = dict(bias=SlopeBias(jnp.asarray(SLOPES, jnp.float32))) if bias else {}
  full = jax.jit(lambda x: m(x, _ctx(cfg, t).replace(**extra)))(x)

  @jax.jit
  def step(x_b1d, cache, pos):
    return m.decode(x_b1d, _ctx(cfg, 1, start=pos).replace(**extra), cache, pos)

  cache = m.init_cache(2, t)
  for i in range(t):
    y, cache = step(x[:, i:i + 1], cache, i)
    np.testing.assert_allclose(y[:, 0], full[:, i], atol=2e-5, rtol=2e-4, err_msg=f"token {i}")
  # the cache holds exactly the latent and the rotated shared key of every token
  np.testing.assert_allclose(cache.c_kv, m.kv_norm(m.kv_down(x)), atol=1e-6)
  assert cache.k_rope.shape == (2, t, cfg.attention.mla.qk_rope_head_dim)


def test_absorbed_weights_fold_the_up_projections():
  """q_lat . c_kv == q_nope . (W_uk c_kv) per head and o_lat applied to a latent == W_o (W_uv latent)."""
  cfg = load_config()
  m = _mla(cfg)
  w = m.absorbed()
  h_in, c = _normal(3, cfg.model.hidden), _normal(4, m.dc)
  q_nope = np.einsum("i,ihn->hn", h_in, m.q.kernel[...][..., :m.dn])
  k_nope = np.einsum("c,chn->hn", c, m.k_up.kernel[...])
  np.testing.assert_allclose(np.einsum("i,ihc,c->h", h_in, w["q_lat"], c), np.sum(q_nope * k_nope, -1), rtol=1e-4,
                             atol=1e-6)
  lat = _normal(5, m.h, m.dc)
  v = np.einsum("hc,chv->hv", lat, m.v_up.kernel[...])
  np.testing.assert_allclose(np.einsum("hc,hcd->d", lat, w["o_lat"]), np.einsum("hv,hvd->d", v, m.o.kernel[...]),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_model_prefill_then_decode_equals_forward(scan_layers):
  cfg = load_config(**{"model.scan_layers": scan_layers, "attention.mla.q_lora_rank": 16})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.model.vocab_size, (2, 9)), jnp.int32)
  full = nnx.jit(lambda model, t: model(t))(model, tokens)
  step = nnx.jit(mla_lib.decode_step)  # the model is a graph node: passed, not closed over
  cache = mla_lib.init_model_cache(model, 2, 9)
  logits, cache = step(model, tokens[:, :5], cache, 0)  # prefill 5 tokens in one call
  np.testing.assert_allclose(logits, full[:, :5], atol=1e-4, rtol=1e-4)
  for i in range(5, 9):
    logits, cache = step(model, tokens[:, i:i + 1], cache, i)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-4, rtol=1e-4, err_msg=f"token {i}")


@pytest.mark.parametrize("size", ["tiny", "0.5B", "1.5B"])
def test_cache_holds_latent_plus_rope_key_per_token_per_layer(size):
  cfg = load_config(size=size)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: mla_lib.init_model_cache(model, 3, 64))
  ml = cfg.attention.mla
  assert [f.name for f in dataclasses.fields(mla_lib.MLACache)] == ["c_kv", "k_rope"]
  assert cache.c_kv.shape == (cfg.model.num_layers, 3, 64, ml.kv_lora_rank)
  assert cache.k_rope.shape == (cfg.model.num_layers, 3, 64, ml.qk_rope_head_dim)
  per_token_per_layer = sum(a.size for a in jax.tree.leaves(cache)) // (cfg.model.num_layers * 3 * 64)
  assert per_token_per_layer == ml.kv_lora_rank + ml.qk_rope_head_dim
  assert mla_lib.MLACache(*jax.tree.leaves(cache)).numbers_per_token == ml.kv_lora_rank + ml.qk_rope_head_dim


# ------------------------------------------------------------------------------------------ sizes and config
@pytest.mark.parametrize("size,q_rank", [("0.5B", 0), ("1.5B", 0), ("1.5B", 768)])
def test_parameter_count_matches_formula(size, q_rank):
  """Per layer: q (d or q_rank -> H (nope + rope)), W_dq + norm, W_dkv + norm, W_kr, W_uk, W_uv, W_o; no biases."""
  cfg = load_config(size=size, **{"attention.mla.q_lora_rank": q_rank})
  m, ml = cfg.model, cfg.attention.mla
  d, h = m.hidden, m.num_heads
  q_in = q_rank or d
  mla_layer = (q_in * h * (ml.qk_nope_head_dim + ml.qk_rope_head_dim) + (d * q_rank + q_rank if q_rank else 0)
               + d * ml.kv_lora_rank + ml.kv_lora_rank + d * ml.qk_rope_head_dim
               + ml.kv_lora_rank * h * (ml.qk_nope_head_dim + ml.v_head_dim) + h * ml.v_head_dim * d)
  gqa_layer = (d + 1) * h * m.head_dim + 2 * (d + 1) * m.num_kv_heads * m.head_dim + h * m.head_dim * d
  gqa_total = {"0.5B": 494_032_768, "1.5B": 1_543_714_304}[size]  # Qwen2.5 (PAPERS.md)
  assert param_counts(cfg)["total"] == gqa_total + m.num_layers * (mla_layer - gqa_layer)


@pytest.mark.parametrize("key,value,message", [
    ("attention.mla.q_lora_rank", -1, "attention.mla.q_lora_rank=-1 must be an integer >= 0"),
    ("attention.mla.kv_lora_rank", 0, "attention.mla.kv_lora_rank=0 must be a positive integer"),
    ("attention.mla.qk_rope_head_dim", 7, "attention.mla.qk_rope_head_dim=7 must be even for RoPE"),
    ("attention.mla.v_head_dim", 0, "attention.mla.v_head_dim=0 must be a positive integer"),
])
def test_config_errors(key, value, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    load_config(**{key: value})


def test_odd_rope_dim_is_fine_without_rope():
  assert load_config(**{"position.kind": "none", "attention.mla.qk_rope_head_dim": 7}).attention.kind == "mla"
