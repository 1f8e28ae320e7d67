"""Qwen2.5-style decoder: embed -> blocks (RMSNorm -> attention -> + -> RMSNorm -> FFN -> +) -> RMSNorm -> tied head.

Blocks are stacked along a leading `layers` axis and run with nnx.scan when `model.scan_layers` (one compiled
block, fast compiles for deep models), else as a Python list. `model.remat` wraps each block in a
rematerialisation policy. Every FFN returns (y, aux): aux scalars whose names end in `_loss` join the
training loss (already weighted), the rest are logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import make_attention
from efficientllm_jax.models.layers import Embed, RMSNorm, SwiGLU, dtype
from efficientllm_jax.models.moe import MoE
from efficientllm_jax.models.positional import PositionContext, make_position
from efficientllm_jax.parallel.sharding import shard

ACT_BTD = ("batch", "length", "act_embed")


def make_ffn(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.ffn.kind == "dense":
    return SwiGLU(cfg, rngs=rngs)
  if cfg.ffn.kind == "moe":
    return MoE(cfg, rngs=rngs)
  raise ValueError(f"ffn.kind={cfg.ffn.kind!r} has no module")


class Block(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.model
    norm = lambda: RMSNorm(m.hidden, eps=m.rms_eps, dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))
    self.attn_norm = norm()
    self.attn = make_attention(cfg, rngs=rngs)
    self.ffn_norm = norm()
    self.ffn = make_ffn(cfg, rngs=rngs)

  def __call__(self, x_btd, ctx: PositionContext):
    x_btd = shard(x_btd + self.attn(self.attn_norm(x_btd), ctx), ACT_BTD)
    y_btd, aux = self.ffn(self.ffn_norm(x_btd))
    return shard(x_btd + y_btd, ACT_BTD), aux


class Transformer(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.model
    self.embed = Embed(cfg, rngs=rngs)
    self.position = make_position(cfg, rngs=rngs)
    self.scan_layers = bool(m.scan_layers)
    if self.scan_layers:
      @nnx.split_rngs(splits=m.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(m.num_layers)])
    self.final_norm = RMSNorm(m.hidden, eps=m.rms_eps, dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))
    self.remat = m.remat
    self.num_layers = m.num_layers

  def _block_fn(self):
    def run(block, x, ctx):
      return block(x, ctx)
    if self.remat != "none":
      run = nnx.remat(run, policy=remat.POLICIES[self.remat], prevent_cse=not self.scan_layers)
    return run

  def hidden(self, tokens_bt, positions_bt=None):
    """Final-norm hidden states [B, T, D] and aux (per-layer mean of each FFN aux scalar)."""
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    x_btd = shard(self.position.embed(self.embed(tokens_bt), positions_bt), ACT_BTD)
    ctx = self.position.context(positions_bt)
    run = self._block_fn()
    if self.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def layers(block, x, ctx):
        return run(block, x, ctx)
      x_btd, aux = layers(self.blocks, x_btd, ctx)
    else:
      auxes = []
      for block in self.blocks:
        x_btd, a = run(block, x_btd, ctx)
        auxes.append(a)
      aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else {}
    aux = {k: jnp.mean(v, axis=0) for k, v in aux.items()}
    return self.final_norm(x_btd), aux

  def __call__(self, tokens_bt, positions_bt=None):
    """Full logits [B, T, vocab] (inference/tests; training uses the chunked loss on `hidden`)."""
    h_btd, _ = self.hidden(tokens_bt, positions_bt)
    return self.embed.attend(h_btd)


def abstract_model(cfg) -> Transformer:
  """The model with ShapeDtypeStruct parameters: no allocation (for counts and sharding plans)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def param_counts(cfg) -> dict[str, int]:
  """Total, embedding and non-embedding parameter counts (the tied head is the embedding, counted once), and
  active: the parameters one token uses, i.e. all but the routed experts it skips (top_k of num_experts run;
  router and shared experts count in full). Dense models: active == total."""
  model = abstract_model(cfg)
  params = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(params))
  embedding = int(model.embed.embedding.size)
  routed = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
               if any(getattr(k, "key", None) == "experts" for k in path))
  skipped = routed * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts if routed else 0
  return {"total": int(total), "embedding": embedding, "non_embedding": int(total) - embedding,
          "active": int(total - skipped)}
