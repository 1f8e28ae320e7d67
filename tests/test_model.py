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
  a, b = model(tok), model(changed)
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
  np.testing.assert_allclose(scanned(tok), unrolled(tok), rtol=1e-5, atol=1e-5)


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
