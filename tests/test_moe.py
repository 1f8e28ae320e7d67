"""MoE FFN: dispatch paths against a plain per-expert loop, capacity drops and aux losses against hand counts and
numpy formulas, parameter counts against the Qwen2.5 dimensions, config errors, and a tiny end-to-end run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from configs.moe import dense as dense_configs
from configs.moe import moe as moe_configs
from efficientllm_jax import config as config_lib
from efficientllm_jax.models import moe as moe_lib
from efficientllm_jax.models.transformer import Transformer, param_counts
from efficientllm_jax.train.step import loss_fn
from tests.conftest import train_config_file


def small_cfg(hidden=16, experts=8, expert_dim=24, **moe):
  c = moe_configs.get_config("tiny")
  c.model.hidden = hidden
  c.moe.num_experts = experts
  c.moe.expert_dim = expert_dim
  c.moe.update(moe)
  return c


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def grads(fn, module, x_btd, r_btd):
  """d/d(params, x) of sum(fn(module, x) * r) for a fixed random cotangent r."""
  graphdef, state = nnx.split(module)
  loss = lambda s, x: jnp.sum(fn(nnx.merge(graphdef, s), x) * r_btd)
  # One compiled program, not op-by-op: eager dispatch compiles every op of the forward and backward on its own
  # (about 200 XLA compiles for the per-expert loop on CPU); the gradients are the same function of (state, x).
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x_btd)


def apply(fn, module, x_btd):
  """fn(module, x) as one compiled program (as in training), not op-by-op (one XLA compile per eager op on CPU)."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x))(state, x_btd)


def random_x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----- dropless vs the per-expert loop -----

@pytest.mark.parametrize("moe_kw", [
    dict(),
    dict(renormalize=False, num_shared_experts=2, shared_expert_dim=8, shared_expert_gate=True),
])
def test_dropless_output_and_gradients_match_reference_loop(moe_kw):
  cfg = small_cfg(**moe_kw)
  m = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
  x = random_x((2, 24, cfg.model.hidden))
  y, aux = apply(lambda mod, x: mod(x), m, x)
  y_ref = apply(moe_lib.reference_forward, m, x)
  assert rel_err(y, y_ref) < 1e-5
  assert float(aux["moe_dropped_frac"]) == 0.0

  r = random_x(y.shape, seed=2)
  (g_state, g_x) = grads(lambda mod, x: mod(x)[0], m, x, r)
  (r_state, r_x) = grads(moe_lib.reference_forward, m, x, r)
  assert rel_err(g_x, r_x) < 1e-5
  flat_g, flat_r = jax.tree.leaves(g_state), jax.tree.leaves(r_state)
  assert len(flat_g) == len(flat_r) >= 4  # router + gate/up/down (+ shared)
  for a, b in zip(flat_g, flat_r):
    assert rel_err(a, b) < 1e-5


def test_dropless_permutations_backward_by_gather_equals_autodiff_of_take():
  """dispatch_sorted / combine_sorted's custom backward (gathers through the known inverse permutation) gives the
  same gradients as autodiff of the plain takes, and the gradient program has no scatter-add left."""
  rng = np.random.default_rng(3)
  n, k, e, d = 37, 2, 5, 8
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
  experts = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)]), jnp.int32)
  scale = jnp.asarray(rng.normal(size=(n * k, d)), jnp.float32)  # stands in for the experts: row-wise, order-bound

  def ours(x, w):
    x_md, plan = moe_lib.dispatch_sorted(x, experts, e)
    return jnp.sum(moe_lib.combine_sorted(jnp.sin(x_md) * scale, w, plan) ** 2)

  def plain(x, w):
    order = jnp.argsort(experts.reshape(-1), stable=True)
    y_md = jnp.sin(jnp.take(x, order // k, axis=0)) * scale
    y_nkd = jnp.take(y_md, jnp.argsort(order), axis=0).reshape(n, k, d)
    return jnp.sum(jnp.einsum("nkd,nk->nd", y_nkd, w) ** 2)

  got, want = jax.value_and_grad(ours, (0, 1))(x, w), jax.value_and_grad(plain, (0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The only scatter-add left is the forward's bincount of the group sizes (integers); autodiff of the plain
  # takes adds one per permutation.
  count = lambda f: str(jax.make_jaxpr(f)(x, w)).count("scatter-add")  # noqa: E731
  assert count(jax.grad(ours)) == count(ours) == 1
  assert count(jax.grad(plain)) == count(plain) + 2


def test_swiglu_halves_gradient_is_one_concatenation_equal_to_autodiff():
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.normal(size=(19, 2 * 6)) * 3, jnp.float32)
  g = jnp.asarray(rng.normal(size=(19, 6)), jnp.float32)
  plain = lambda h: jnp.sum(jax.nn.silu(h[:, :6]) * h[:, 6:] * g)  # noqa: E731
  ours = lambda h: jnp.sum(moe_lib.swiglu_halves(h) * g)  # noqa: E731
  np.testing.assert_allclose(ours(h), plain(h), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(h), jax.grad(plain)(h), rtol=1e-5, atol=1e-6)
  text = str(jax.make_jaxpr(jax.grad(ours))(h))
  assert "concatenate" in text and " pad" not in text  # autodiff of the slices pads each half and adds them
  assert " pad" in str(jax.make_jaxpr(jax.grad(plain))(h))


def test_capacity_mode_with_ample_capacity_equals_dropless():
  x = random_x((2, 16, 16))
  dropless = moe_lib.MoE(small_cfg(capacity_factor=0.0), rngs=nnx.Rngs(0))
  # cf = E / k gives C = N: no expert can overflow.
  ample = moe_lib.MoE(small_cfg(capacity_factor=4.0), rngs=nnx.Rngs(0))
  assert moe_lib.capacity(32, 2, 8, 4.0) == 32
  (y0, a0), (y1, a1) = apply(lambda mod, x: mod(x), dropless, x), apply(lambda mod, x: mod(x), ample, x)
  assert rel_err(y1, y0) < 1e-5
  assert float(a1["moe_dropped_frac"]) == 0.0
  np.testing.assert_allclose(a1["moe_load"], a0["moe_load"])


# ----- hand-built routing: 8 tokens, 4 experts, top-2 -----

# (first choice, second choice) per token.
HAND_EXPERTS = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 3], [0, 3], [1, 2], [3, 1]])
# Capacity 2 per expert, first choices served first in token order (GShard):
#   first choices:  e0 <- t0 t1 (t2, t5 dropped); e1 <- t3 t6; e2 <- t4; e3 <- t7
#   second choices: t0->e1 full; t1->e2 kept; t2->e1 full; t3->e0 full; t4->e3 kept; t5->e3 full;
#                   t6->e2 full; t7->e1 full
HAND_KEEP = np.array([[1, 0], [1, 1], [0, 0], [1, 0], [1, 1], [0, 0], [1, 0], [1, 0]], bool)
HAND_DROPPED = 8


def hand_logits():
  """Logits realising HAND_EXPERTS: 3 for the first choice, 2 for the second, a distinct small value elsewhere."""
  logits = np.tile(np.array([0.0, 0.1, 0.2, 0.3]), (8, 1))
  logits[np.arange(8), HAND_EXPERTS[:, 0]] = 3.0
  logits[np.arange(8), HAND_EXPERTS[:, 1]] = 2.0
  return logits


def hand_module(**moe):
  """A 4-expert MoE whose router maps one-hot token n to hand_logits()[n]; returns (module, one-hot x [1, 8, 16])."""
  cfg = small_cfg(hidden=16, experts=4, **moe)
  m = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
  router = np.zeros((16, 4), np.float32)
  router[:8] = hand_logits()
  m.router[...] = jnp.asarray(router)
  return m, jnp.eye(16, dtype=jnp.float32)[None, :8]


def test_tight_capacity_drops_the_hand_counted_assignments():
  x_nd = random_x((8, 16))
  buf_ecd, plan, dropped = moe_lib.dispatch_capacity(x_nd, jnp.asarray(HAND_EXPERTS), 4, 2)
  assert int(dropped) == HAND_DROPPED
  np.testing.assert_array_equal(plan.keep_nk, HAND_KEEP)
  expected_rows = {0: [0, 1], 1: [3, 6], 2: [4, 1], 3: [7, 4]}  # tokens in each expert's two slots
  for e, toks in expected_rows.items():
    np.testing.assert_array_equal(buf_ecd[e], x_nd[np.array(toks)])


def test_tight_capacity_module_reports_drops_and_zeroes_them():
  m, x = hand_module(capacity_factor=0.5)  # C = ceil(0.5 * 8 * 2 / 4) = 2
  assert moe_lib.capacity(8, 2, 4, 0.5) == 2
  y, aux = apply(lambda mod, x: mod(x), m, x)
  assert float(aux["moe_dropped_frac"]) * 16 == pytest.approx(HAND_DROPPED)
  keep = jnp.asarray(HAND_KEEP)
  assert rel_err(y, apply(lambda mod, x: moe_lib.reference_forward(mod, x, keep_nk=keep), m, x)) < 1e-5
  # Tokens 2 and 5 lost both experts: their output is exactly zero.
  np.testing.assert_array_equal(y[0, np.array([2, 5])], 0.0)


def test_aux_losses_and_logged_stats_equal_their_formulas():
  m, x = hand_module(aux_loss_coef=0.01, z_loss_coef=0.001)
  _, aux = m(x)
  logits = hand_logits()
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  f = np.bincount(HAND_EXPERTS.reshape(-1), minlength=4) / 16.0  # [5, 5, 3, 3] / 16
  np.testing.assert_allclose(f, [5 / 16, 5 / 16, 3 / 16, 3 / 16])
  balance = 4 * np.sum(f * probs.mean(0))
  lse = np.log(np.exp(logits).sum(-1))
  z = np.mean(lse ** 2)
  entropy = np.mean(-np.sum(probs * np.log(probs), -1))
  layers = m.num_layers
  np.testing.assert_allclose(aux["moe_load"], f, rtol=1e-6)
  np.testing.assert_allclose(aux["moe_balance"], balance, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_aux_loss"], layers * 0.01 * balance, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_router_z"], z, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_z_loss"], layers * 0.001 * z, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_router_entropy"], entropy, rtol=1e-5)
  assert set(aux) == {"moe_aux_loss", "moe_z_loss", "moe_balance", "moe_router_z", "moe_router_entropy",
                      "moe_load", "moe_dropped_frac"}


def test_balance_gradient_flows_through_probabilities_only():
  # d/dP of E * sum f P is E * f (f is a count: no gradient); chain through mean over tokens.
  probs = jax.nn.softmax(random_x((8, 4)))
  g = jax.grad(moe_lib.balance_loss)(probs, jnp.asarray(HAND_EXPERTS))
  f = np.bincount(HAND_EXPERTS.reshape(-1), minlength=4) / 16.0
  np.testing.assert_allclose(g, np.broadcast_to(4 * f / 8, (8, 4)), rtol=1e-6)


def test_topk_weights_renormalised_sum_to_one_raw_ones_are_the_probabilities():
  logits = random_x((64, 8)) * 3
  r = moe_lib.route(logits, 2, renormalize=True)
  np.testing.assert_allclose(jnp.sum(r.weights_nk, -1), 1.0, rtol=1e-6)
  raw = moe_lib.route(logits, 2, renormalize=False)
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1)[:, :2]
  np.testing.assert_array_equal(raw.experts_nk, top)
  np.testing.assert_allclose(raw.weights_nk, np.take_along_axis(p, top, -1), rtol=1e-5)
  assert np.all(np.sum(raw.weights_nk, -1) < 1)
  np.testing.assert_allclose(r.weights_nk, raw.weights_nk / raw.weights_nk.sum(-1, keepdims=True), rtol=1e-6)


# ----- transformer integration, parameter counts, configs -----

def test_transformer_adds_moe_losses_and_logs_load():
  cfg = small_cfg(hidden=32, experts=4, z_loss_coef=0.001)
  cfg.model.vocab_size = 512
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 512)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
  graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param)
  total, metrics = jax.jit(lambda p, b: loss_fn(p, graphdef, b, cfg))(params, batch)  # one compile, as in training
  assert metrics["moe_load"].shape == (4,)  # per-expert load, averaged over the 2 layers
  np.testing.assert_allclose(jnp.sum(metrics["moe_load"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(total, metrics["loss"] + metrics["moe_aux_loss"] + metrics["moe_z_loss"], rtol=1e-6)
  assert float(metrics["moe_aux_loss"]) > 0 and float(metrics["moe_z_loss"]) > 0


def qwen_counts(size: str, experts: int = 0, top_k: int = 0) -> tuple[int, int]:
  """(total, active) by hand from PAPERS.md's Qwen2.5 dimensions; experts=0 is the dense model."""
  s = base.SIZES[size]
  v, d, layers, h, kv, hd, f = 151936, s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["ffn"]
  attn = (d * h * hd + h * hd) + 2 * (d * kv * hd + kv * hd) + h * hd * d  # q, k, v with bias; o without
  swiglu = 3 * d * f
  ffn = experts * swiglu + d * experts if experts else swiglu  # experts + router
  total = v * d + layers * (attn + 2 * d + ffn) + d
  active = total - layers * (experts - top_k) * swiglu if experts else total
  return total, active


def test_param_counts_total_and_active():
  c = param_counts(moe_configs.get_config("0.5Bx8"))
  assert (c["total"], c["active"]) == qwen_counts("0.5B", 8, 2) == (2_690_709_376, 807_991_168)
  c = param_counts(moe_configs.get_config("1.5Bx8"))
  assert (c["total"], c["active"]) == qwen_counts("1.5B", 8, 2)
  dense = param_counts(dense_configs.get_config("1.5B"))
  assert dense["total"] == dense["active"] == qwen_counts("1.5B")[0] == 1_543_714_304  # PAPERS.md
  assert dense["non_embedding"] == dense["total"] - dense["embedding"]


def test_moe_presets():
  for arg, size, micro in (("0.5Bx8", "0.5B", 4), ("1.5Bx8", "1.5B", 2)):
    c = config_lib.validate(moe_configs.get_config(arg))
    assert (c.ffn.kind, c.moe.num_experts, c.moe.top_k) == ("moe", 8, 2)
    assert c.moe.expert_dim == base.SIZES[size]["ffn"] and c.model.hidden == base.SIZES[size]["hidden"]
    assert (c.train.micro_batch, c.data.seq_len, c.moe.capacity_factor) == (micro, 8192, 0.0)
  assert dense_configs.get_config("3B").model.hidden == 2048
  with pytest.raises(ValueError, match="0.5Bx8"):
    moe_configs.get_config("2B")


@pytest.mark.parametrize("override, message", [
    ({"moe.top_k": 9}, "moe.top_k=9 exceeds moe.num_experts=8"),
    ({"moe.num_experts": 0}, "moe.num_experts=0 must be a positive integer"),
    ({"moe.expert_dim": -1}, "moe.expert_dim=-1 must be a positive integer"),
    ({"moe.top_k": 1}, "moe.renormalize=True with moe.top_k=1"),
    ({"moe.capacity_factor": "big"}, "moe.capacity_factor='big' must be a number"),
    ({"moe.aux_loss_coef": -0.01}, "moe.aux_loss_coef=-0.01 must be a number >= 0"),
    ({"moe.shared_expert_gate": True}, "moe.shared_expert_gate=True gates a shared expert"),
    ({"moe.num_shared_experts": 1.5}, "moe.num_shared_experts=1.5 must be a whole number"),
    ({"ffn.kind": "sparse"}, "ffn.kind='sparse' is not known: use one of dense, moe"),
])
def test_config_errors(override, message):
  c = moe_configs.get_config("tiny")
  for key, value in override.items():
    section, name = key.split(".")
    # A fresh section: ConfigDict is type-safe, and these checks exist for values of the wrong type too.
    c[section] = ml_collections.ConfigDict({**c[section].to_dict(), name: value})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_dense_config_ignores_moe_section():
  c = dense_configs.get_config("tiny")
  c.moe.top_k = 99
  config_lib.validate(c)


# ----- end to end -----

@pytest.mark.slow
def test_tiny_moe_trains_with_falling_loss(tmp_path, capfd):
  """configs/moe/moe.py:tiny end to end (tests/conftest.py:train_config_file, as `python -m launch` runs it)."""
  summary, rows = train_config_file("configs/moe/moe.py", tmp_path, **{"train.warmup_steps": 2})
  assert "ffn moe" in capfd.readouterr().out
  assert summary["final_loss"] < summary["first_loss"] - 0.5
  train = [r for r in rows if r["split"] == "train"]
  assert {f"moe_load_{e}" for e in range(8)} <= set(train[-1])
  assert sum(train[-1][f"moe_load_{e}"] for e in range(8)) == pytest.approx(1.0)
  assert train[-1]["moe_aux_loss"] > 0 and train[-1]["moe_dropped_frac"] == 0.0


def test_impl_auto_is_ragged_dot_off_gpu_and_explicit_choices_stand():
  from efficientllm_jax.models import moe as moe_lib
  assert jax.default_backend() == "cpu"
  assert moe_lib.resolve_impl("auto") == "ragged_dot"  # interpret-mode Pallas would crawl on CPU
  assert moe_lib.resolve_impl("pallas") == "pallas" and moe_lib.resolve_impl("ragged_dot") == "ragged_dot"
