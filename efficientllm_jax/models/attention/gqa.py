"""MHA / GQA / MQA: one module, `model.num_kv_heads` decides (MHA = heads, Qwen2.5 GQA = 2, MQA = 1)."""

from __future__ import annotations

from flax import nnx

from efficientllm_jax.models.attention import ops
from efficientllm_jax.models.layers import dense
from efficientllm_jax.models.positional import PositionContext, rotate
from efficientllm_jax.parallel.sharding import shard


class GQAAttention(nnx.Module):
  """Qwen2 attention: biased q/k/v projections, RoPE on q and k, unbiased output projection."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.model
    d, h, kv, hd = m.hidden, m.num_heads, m.num_kv_heads, m.head_dim
    self.q = dense(d, (h, hd), ("embed", "heads", "head_dim"), cfg=cfg, rngs=rngs, use_bias=m.qkv_bias)
    self.k = dense(d, (kv, hd), ("embed", "kv_heads", "head_dim"), cfg=cfg, rngs=rngs, use_bias=m.qkv_bias)
    self.v = dense(d, (kv, hd), ("embed", "kv_heads", "head_dim"), cfg=cfg, rngs=rngs, use_bias=m.qkv_bias)
    self.o = dense((h, hd), d, ("heads", "head_dim", "embed"), cfg=cfg, rngs=rngs, axis=(-2, -1))
    self.impl = cfg.attention.impl
    self.pallas = ops.PallasBlocks.from_config(cfg)  # flash-kernel tiles (impl pallas)
    self.window = int(cfg.attention.window)

  def __call__(self, x_btd, ctx: PositionContext):
    q_bthd = shard(rotate(self.q(x_btd), ctx), ("batch", "length", "act_heads", None))
    k_bshd = shard(rotate(self.k(x_btd), ctx), ("batch", "length", "act_kv_heads", None))
    v_bshd = shard(self.v(x_btd), ("batch", "length", "act_kv_heads", None))
    out_bthd = ops.attention(q_bthd, k_bshd, v_bshd, impl=self.impl, bias=ctx.bias, window=self.window,
                             pallas=self.pallas)
    return self.o(out_bthd)
