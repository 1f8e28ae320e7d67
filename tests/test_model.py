"""The decoder: causality, scan vs unrolled layers, remat policies, all against the model's own math re-run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficientllm_jax.models.transformer import Transformer
from tests.conftest import tiny_config


def _tokens(cfg, b=2, t=24, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.model.vocab_size)


@pytest.mark.parametrize("scan", [True, False])
def test_causal_future_tokens_do_not_change_past_logits(scan):
  cfg = tiny_config(**{"model.scan_layers": scan})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tok = _tokens(cfg)
  t = 10
  changed = tok.at[:, t + 1:].set((tok[:, t + 1:] + 7) % cfg.model.vocab_size)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))  # one compile, not one per eager op
  a, b = logits(state, tok), logits(state, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])  # the change is visible where it should be


def test_scan_equals_unrolled_layers():
  cfg_s = tiny_config(**{"model.scan_layers": True})
  cfg_u = tiny_config(**{"model.scan_layers": False})
  scanned = Transformer(cfg_s, rngs=nnx.Rngs(0))
  unrolled = Transformer(cfg_u, rngs=nnx.Rngs(1))
  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(unrolled.blocks):
    nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
  for name in ("embed", "final_norm"):
    nnx.update(getattr(unrolled, name), nnx.state(getattr(scanned, name)))
  tok = _tokens(cfg_s)
  logits = lambda m: jax.jit(lambda s, t: nnx.merge(nnx.graphdef(m), s)(t))(nnx.state(m), tok)  # noqa: E731 - one compile each
  np.testing.assert_allclose(logits(scanned), logits(unrolled), rtol=1e-5, atol=1e-5)


# dots_kernels on a dense model is dots_attention (no grouped matmul to name): its MoE case covers it.
@pytest.mark.parametrize("policy,ffn", [("full", "dense"), ("dots", "dense"), ("dots_attention", "dense"),
                                        ("dots_kernels", "moe")])  # moe: ragged_dot outputs named and kept
def test_remat_changes_memory_not_math(policy, ffn):
  tok = _tokens(tiny_config())

  def loss_and_grads(remat):
    cfg = tiny_config(**{"model.remat": remat, "ffn.kind": ffn})
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p):
      return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tok))[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grads("none"), loss_and_grads(policy)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_logical_axis_names_on_parameters():
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  assert model.embed.embedding.sharding_names == ("vocab", "embed")
  assert model.blocks.attn.q.kernel.sharding_names == ("layers", "embed", "heads", "head_dim")
  assert model.blocks.ffn.down.kernel.sharding_names == ("layers", "mlp", "embed")


def test_bias_added_and_its_gradient_summed_in_fp32():
  """layers.Dense with bf16 compute: the output is bf16(x @ W + b) with b added in fp32, and the bias gradient
  (a sum over every token) is reduced from an fp32 cotangent, so its value matches float64 over 4096 tokens."""
  from efficientllm_jax.models import layers
  cfg = tiny_config(**{"model.dtype": "bfloat16"})
  lin = layers.dense(32, (4, 8), ("embed", "heads", "head_dim"), cfg=cfg, rngs=nnx.Rngs(0), use_bias=True)
  rng = np.random.default_rng(0)
  lin.bias[...] = jnp.asarray(rng.normal(size=(4, 8)) * 3, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4096, 32)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(4096, 4, 8)) + 0.5, jnp.bfloat16)  # a mean far from 0: bf16 sums drift
  y = lin(x)
  assert y.dtype == jnp.bfloat16
  exact = np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64).reshape(32, 32) \
      + np.asarray(lin.bias[...], np.float64).reshape(32)
  np.testing.assert_allclose(np.asarray(y, np.float64).reshape(4096, 32), exact, rtol=1e-2, atol=2e-2)

  graph, state = nnx.split(lin)

  def loss(state):
    return jnp.sum(nnx.merge(graph, state)(x).astype(jnp.float32) * g.astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
  sums = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum" and e.outvars[0].aval.shape == (4, 8)]
  assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums), [str(e) for e in sums]
  db = np.asarray(jax.jit(jax.grad(loss))(state)["bias"][...], np.float64)
  np.testing.assert_allclose(db, np.asarray(g, np.float64).sum(0), rtol=1e-5)
