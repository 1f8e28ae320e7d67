"""Position schemes against independent references: formulas written out here, numpy loops, the papers' numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from efficientllm_jax import config as config_lib
from efficientllm_jax.models import positional as pos
from efficientllm_jax.models.attention import ops
from efficientllm_jax.models.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rope", "sinusoidal", "learned", "relative", "alibi", "none")


def small_cfg(kind: str, **position):
  """A very small decoder (fast on CPU) with the given position kind."""
  c = base.get_config("tiny")
  c.model.update(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64)
  c.data.seq_len = 16
  c.position.kind = kind
  c.position.max_len = 16
  c.position.update(position)
  return c


# ------------------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_score_depends_only_on_offset(fraction):
  cfg = small_cfg("rope", rope_theta=10000.0, rope_fraction=fraction)
  cfg.model.head_dim = 16
  rope = pos.RoPE(cfg, rngs=nnx.Rngs(0))
  qk = jax.random.normal(jax.random.key(1), (1, 2, 1, 16))  # slot 0 = q, slot 1 = k, one head

  def score(m, n):
    ctx = rope.context(jnp.array([[m, n]]))
    r = pos.rotate(qk, ctx)
    return float(jnp.dot(r[0, 0, 0], r[0, 1, 0]))

  for m, n in [(7, 3), (40, 2), (5, 5), (3, 9)]:
    base_score = score(m, n)
    for shift in (1, 17, 250, 1000):
      np.testing.assert_allclose(score(m + shift, n + shift), base_score, rtol=1e-4, atol=1e-4)
  assert abs(score(7, 3) - score(9, 3)) > 1e-3  # the offset does matter (not an identity map)
  if fraction < 1:  # unrotated dims pass through unchanged
    rot = pos.rotate(qk, rope.context(jnp.array([[11, 4]])))
    np.testing.assert_array_equal(rot[..., 8:], qk[..., 8:])


# ------------------------------------------------------------------------------------------------ sinusoidal


def vaswani_table(num_pos: int, d: int) -> np.ndarray:
  pe = np.zeros((num_pos, d))
  for p in range(num_pos):
    for i in range(d // 2):
      angle = p / 10000 ** (2 * i / d)
      pe[p, 2 * i] = math.sin(angle)
      pe[p, 2 * i + 1] = math.cos(angle)
  return pe


def test_sinusoidal_equals_closed_form():
  cfg = small_cfg("sinusoidal")
  sin = pos.Sinusoidal(cfg, rngs=nnx.Rngs(0))
  positions = jnp.array([[0, 1, 2, 3, 50, 99], [5, 6, 7, 8, 9, 10]])
  expected = vaswani_table(100, 32)[np.asarray(positions)]
  got = sin.embed(jnp.zeros((2, 6, 32)), positions)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  np.testing.assert_allclose(sin.embed(x, positions), np.asarray(x) * math.sqrt(32) + expected, atol=2e-5)


# -------------------------------------------------------------------------------------------------- learned


def test_learned_adds_its_rows():
  cfg = small_cfg("learned")
  learned = pos.Learned(cfg, rngs=nnx.Rngs(0))
  positions = jnp.array([[0, 3, 15], [1, 2, 4]])
  table = np.asarray(learned.embedding[...])
  np.testing.assert_allclose(learned.embed(jnp.ones((2, 3, 32)), positions), 1.0 + table[np.asarray(positions)])


def test_learned_over_length_rejected():
  c = base.get_config("tiny")
  c.position.kind = "learned"
  c.data.seq_len = 256
  with pytest.raises(config_lib.ConfigError, match=r"position.max_len=128 is shorter than data.seq_len=256: .* "
                     r"set --config.position.max_len=256"):
    config_lib.validate(c)
  c.position.max_len = 256
  config_lib.validate(c)


def test_learned_over_length_is_one_line_from_launch(tmp_path):
  r = subprocess.run([sys.executable, "-m", "launch", "--config=configs/positional/learned.py:tiny",
                      f"--workdir={tmp_path}", "--config.data.seq_len=512"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip() == ("error: position.max_len=128 is shorter than data.seq_len=512: the learned table has "
                              "one row per position, so set --config.position.max_len=512 (or more) or a shorter "
                              "data.seq_len")


# ------------------------------------------------------------------------------------------ T5 relative bias


def t5_bucket_reference(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
  """Raffel et al., unidirectional: n = max(i - j, 0); exact below nb/2, log-spaced above, capped at nb - 1."""
  n = np.maximum(rel, 0).astype(np.float64)
  exact = num_buckets // 2
  large = exact + np.floor(np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return np.where(n < exact, n, np.minimum(large, num_buckets - 1)).astype(np.int64)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 1000)])
def test_relative_buckets_equal_t5_formula(num_buckets, max_distance):
  q = np.arange(0, 3000, 7)
  k = np.concatenate([np.arange(0, 300), np.arange(300, 3000, 13)])
  rel = q[:, None] - k[None, :]  # includes future keys (negative) and distances far past max_distance
  got = pos.t5_buckets(jnp.asarray(q), jnp.asarray(k), num_buckets, max_distance)
  np.testing.assert_array_equal(got, t5_bucket_reference(rel, num_buckets, max_distance))


def test_relative_buckets_known_values():
  # worked by hand from the formula for the T5 defaults (32 buckets, max distance 128)
  n = np.array([0, 1, 15, 16, 17, 18, 19, 32, 64, 127, 128, 129, 5000, -3])
  want = np.array([0, 1, 15, 16, 16, 16, 17, 21, 26, 31, 31, 31, 31, 0])
  np.testing.assert_array_equal(pos.t5_buckets(jnp.asarray(n), jnp.zeros(1, jnp.int32), 32, 128)[:, 0], want)


def test_relative_dense_reads_table_by_bucket():
  cfg = small_cfg("relative")
  rel = pos.Relative(cfg, rngs=nnx.Rngs(0))
  bias = rel.context(jnp.zeros((1, 8), jnp.int32)).bias
  table = np.asarray(rel.table[...])  # [32, H]
  q, k = np.arange(8) + 200, np.arange(208)  # a query chunk at offset 200 against all earlier keys
  want = np.transpose(table[t5_bucket_reference(q[:, None] - k[None, :], 32, 128)], (2, 0, 1))
  got = bias.dense(jnp.asarray(q), jnp.asarray(k))
  assert got.shape == (4, 8, 208) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want)


# --------------------------------------------------------------------------------------------------- ALiBi

H8 = [2.0 ** -i for i in range(1, 9)]  # 1/2, 1/4, ..., 1/256
ALIBI = {
    8: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625],
    # 12 heads: the 8 above, then every other slope of 16 heads (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)
    12: H8 + [0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845],
    # 14 heads: the 8 above, then 2^-0.5 ... 2^-5.5
    14: H8 + [0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845,
              0.04419417382415922, 0.02209708691207961],
}


@pytest.mark.parametrize("heads", [8, 12, 14])
def test_alibi_slopes_match_paper(heads):
  np.testing.assert_allclose(pos.alibi_slopes(heads), ALIBI[heads], rtol=1e-12)


def test_alibi_dense_and_attention_with_it():
  cfg = small_cfg("alibi")
  bias = pos.ALiBi(cfg, rngs=nnx.Rngs(0)).context(jnp.zeros((1, 6), jnp.int32)).bias
  slopes = np.array([0.25, 0.0625, 0.015625, 0.00390625])  # 4 heads: 2^(-8h/4)
  q_pos, k_pos = np.arange(6) + 4, np.arange(10)
  want = -slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :])
  np.testing.assert_allclose(bias.dense(jnp.asarray(q_pos), jnp.asarray(k_pos)), want, rtol=1e-6)

  # through the attention dispatch's documented bias interface, against a plain numpy softmax attention
  t, h, kvh, d = 6, 4, 2, 8
  q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (1, t, n, d))) for i, n in enumerate((h, kvh, kvh)))
  out = ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla", bias=bias)
  ref = np.zeros((1, t, h, d))
  for hh in range(h):
    kv = hh // (h // kvh)
    for i in range(t):
      logits = np.array([q[0, i, hh] @ k[0, j, kv] / math.sqrt(d) - slopes[hh] * (i - j) for j in range(i + 1)])
      p = np.exp(logits - logits.max())
      ref[0, i, hh] = (p / p.sum()) @ v[0, : i + 1, kv]
  np.testing.assert_allclose(out, ref, atol=2e-5)


# ---------------------------------------------------------------------------------------- whole-model checks


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_causal(kind):
  cfg = small_cfg(kind)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  cut = 9
  perturbed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % 64)
  forward = nnx.jit(lambda m, x: m(x))  # one compile for both calls (eager dispatch is slower on CPU)
  a, b = forward(model, tokens), forward(model, perturbed)
  np.testing.assert_allclose(a[:, :cut], b[:, :cut], atol=1e-6)  # earlier logits ignore the future
  assert float(jnp.max(jnp.abs(a[:, cut:] - b[:, cut:]))) > 1e-4  # and the perturbation did reach the model


def test_relative_table_gets_gradients_through_the_layer_scan():
  # the table reaches every layer as a broadcast input of nnx.scan: its gradient must come back out
  cfg = small_cfg("relative")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)

  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

  grads = nnx.jit(nnx.grad(loss))(model)
  g = np.asarray(grads.position.table[...])
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-7


def test_mla_gets_its_decoupled_rope_width():
  cfg = small_cfg("rope")
  cfg.attention.kind = "mla"
  cfg.attention.mla.qk_rope_head_dim = 6
  ctx = pos.make_position(cfg, rngs=nnx.Rngs(0)).context(jnp.zeros((1, 4), jnp.int32))
  assert ctx.cos.shape == (1, 4, 3)


# ------------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", ["tiny", "1.5B"])
def test_configs_validate(kind, size):
  from importlib import import_module
  c = import_module(f"configs.positional.{kind}").get_config(size)
  config_lib.validate(c)
  assert c.position.kind == kind
  if size == "1.5B":
    assert (c.model.hidden, c.model.num_heads, c.model.num_kv_heads, c.data.seq_len, c.train.micro_batch) == (
        1536, 12, 2, 8192, 2)


@pytest.mark.parametrize("changes,message", [
    (dict(kind="relative", max_distance=16), r"position.max_distance=16 must exceed position.num_buckets/2=16"),
    (dict(kind="relative", num_buckets=1), r"position.num_buckets=1 leaves no log-spaced buckets"),
    (dict(kind="relative", num_buckets=0), r"position.num_buckets=0 must be a positive integer"),
    (dict(kind="learned", max_len=0), r"position.max_len=0 must be a positive integer"),
    (dict(kind="rotary"), r"position.kind='rotary' is not known: use one of rope, sinusoidal, learned, relative, "
                          r"alibi, none"),
])
def test_position_config_errors(changes, message):
  c = base.get_config("tiny")
  c.position.update(changes)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("kind", ["relative", "alibi"])
def test_bias_kinds_reject_forced_cudnn_and_mosaic(kind):
  c = base.get_config("tiny")
  c.position.kind, c.attention.impl = kind, "cudnn"
  with pytest.raises(config_lib.ConfigError, match=r"use --config.attention.impl=auto \(falls back to xla\) or xla"):
    config_lib.validate(c)
  c.attention.impl = "mosaic"
  with pytest.raises(config_lib.ConfigError, match=r"Mosaic GPU kernels do not take: use --config.attention.impl=pallas"):
    config_lib.validate(c)


def test_sinusoidal_needs_even_hidden():
  c = base.get_config("tiny")
  c.position.kind, c.model.hidden = "sinusoidal", 127
  with pytest.raises(config_lib.ConfigError, match=r"model.hidden=127 dims: use an even model.hidden"):
    config_lib.validate(c)


@pytest.mark.parametrize("kind", ["sinusoidal", "learned", "relative", "alibi", "none"])
def test_mla_with_a_non_rope_kind_is_defined(kind):
  # MLA leaves its decoupled dims unrotated under non-rope kinds (mla.py's docstring); the combination validates
  # and builds no RoPE context.
  c = base.get_config("tiny")
  c.attention.kind, c.position.kind = "mla", kind
  config_lib.validate(c)
  ctx = pos.make_position(c, rngs=nnx.Rngs(0)).context(jnp.zeros((1, 4), jnp.int32))
  assert ctx.cos is None
