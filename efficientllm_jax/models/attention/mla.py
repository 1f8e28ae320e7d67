"""MLA: multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1).

Training path (per token h, per head i):
  c_kv = RMSNorm(W_dkv h)                      latent of kv_lora_rank, the only K/V state besides k_rope
  k_nope_i = W_uk_i c_kv,  v_i = W_uv_i c_kv   per-head up-projections of the latent
  k_rope = RoPE(W_kr h)                        one decoupled key of qk_rope_head_dim shared by all heads
  c_q = RMSNorm(W_dq h) if q_lora_rank else h  optional query compression (0 = none, as DeepSeek-V2-Lite)
  [q_nope_i; q_rope_i] = W_q_i c_q,  q_rope_i <- RoPE(q_rope_i)
  o = W_o [softmax([q_nope_i; q_rope_i] . [k_nope_i; k_rope] / sqrt(nope + rope)) v_i]_i
No biases on any projection (DeepSeek-V2 has none). Under position.kind == "rope" only the decoupled dims are
rotated (the RoPE context carries qk_rope_head_dim / 2 frequencies; position.rope_fraction does not apply).
Under any other position kind q_rope / k_rope stay unrotated: the shared key part then carries no position,
additive absolute schemes act on the embeddings and logit biases (relative, ALiBi) are added as for any kind.

Inference path (`MLA.decode`, `decode_step`): the cache holds per token and layer only c_kv and the rotated
k_rope (kv_lora_rank + qk_rope_head_dim numbers). W_uk is absorbed into the query (q_lat = W_uk^T q_nope, so
q_nope . k_nope = q_lat . c_kv) and W_uv into the output projection (W_o W_uv applied to the latent-space
attention output), so keys and values are never expanded per head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from efficientllm_jax.models.attention import ops
from efficientllm_jax.models.layers import RMSNorm, dense, dtype
from efficientllm_jax.models.positional import PositionContext, rotate


@struct.dataclass
class MLACache:
  """Decode cache: per token the normed latent and the rotated shared RoPE key (leading [layers] in a model)."""
  c_kv: jax.Array  # [..., B, S_max, kv_lora_rank]
  k_rope: jax.Array  # [..., B, S_max, qk_rope_head_dim]

  @property
  def numbers_per_token(self) -> int:
    return self.c_kv.shape[-1] + self.k_rope.shape[-1]


class MLA(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m, ml = cfg.model, cfg.attention.mla
    d, h = m.hidden, m.num_heads
    self.h, self.dn, self.dr, self.dv = h, int(ml.qk_nope_head_dim), int(ml.qk_rope_head_dim), int(ml.v_head_dim)
    self.dc, self.dq = int(ml.kv_lora_rank), int(ml.q_lora_rank)
    norm = lambda dim, name: RMSNorm(dim, eps=m.rms_eps, dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype),
                                     name=name)
    if self.dq:
      self.q_down = dense(d, self.dq, ("embed", "q_lora"), cfg=cfg, rngs=rngs)
      self.q_norm = norm(self.dq, "q_lora")
      self.q = dense(self.dq, (h, self.dn + self.dr), ("q_lora", "heads", "head_dim"), cfg=cfg, rngs=rngs)
    else:
      self.q = dense(d, (h, self.dn + self.dr), ("embed", "heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.kv_down = dense(d, self.dc, ("embed", "kv_lora"), cfg=cfg, rngs=rngs)
    self.kv_norm = norm(self.dc, "kv_lora")
    self.k_rope = dense(d, self.dr, ("embed", "head_dim"), cfg=cfg, rngs=rngs)
    self.k_up = dense(self.dc, (h, self.dn), ("kv_lora", "heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.v_up = dense(self.dc, (h, self.dv), ("kv_lora", "heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.o = dense((h, self.dv), d, ("heads", "head_dim", "embed"), cfg=cfg, rngs=rngs, axis=(-2, -1))
    self.scale = 1.0 / math.sqrt(self.dn + self.dr)
    self.impl = cfg.attention.impl
    self.pallas = ops.PallasBlocks.from_config(cfg)  # flash-kernel tiles (impl pallas)
    self.window = int(cfg.attention.window)
    self.dtype = dtype(m.dtype)

  # ---------------------------------------------------------------------------------------------- shared parts
  def _q_input(self, x_btd):
    return self.q_norm(self.q_down(x_btd)) if self.dq else x_btd

  def _latent(self, x_btd, ctx: PositionContext):
    """(c_kv [B, T, dc], rotated k_rope [B, T, dr]): exactly what the cache stores."""
    c_btc = self.kv_norm(self.kv_down(x_btd))
    kr_btr = rotate(self.k_rope(x_btd)[:, :, None, :], ctx)[:, :, 0, :]
    return c_btc, kr_btr

  # ----------------------------------------------------------------------------------------------- training
  def __call__(self, x_btd, ctx: PositionContext):
    q_bthe = self.q(self._q_input(x_btd))
    q_bthd = jnp.concatenate([q_bthe[..., :self.dn], rotate(q_bthe[..., self.dn:], ctx)], axis=-1)
    c_btc, kr_btr = self._latent(x_btd, ctx)
    b, t, _ = c_btc.shape
    kr_bthr = jnp.broadcast_to(kr_btr[:, :, None, :], (b, t, self.h, self.dr))
    k_bthd = jnp.concatenate([self.k_up(c_btc), kr_bthr], axis=-1)
    v_bthv = self.v_up(c_btc)
    out_bthv = ops.attention(q_bthd, k_bthd, v_bthv, impl=self.impl, scale=self.scale, bias=ctx.bias,
                             window=self.window, pallas=self.pallas)
    return self.o(out_bthv)

  # ---------------------------------------------------------------------------------------------- inference
  def init_cache(self, batch: int, max_len: int) -> MLACache:
    return MLACache(c_kv=jnp.zeros((batch, max_len, self.dc), self.dtype),
                    k_rope=jnp.zeros((batch, max_len, self.dr), self.dtype))

  def absorbed(self):
    """Folded weights: q_lat [in, H, dc] = W_q_nope . W_uk, q_rope [in, H, dr], o_lat [H, dc, D] = W_uv . W_o."""
    w_q = self.q.kernel[...].astype(jnp.float32)
    w_uk, w_uv = self.k_up.kernel[...].astype(jnp.float32), self.v_up.kernel[...].astype(jnp.float32)
    w_o = self.o.kernel[...].astype(jnp.float32)
    q_lat = jnp.einsum("ihn,chn->ihc", w_q[..., :self.dn], w_uk)
    o_lat = jnp.einsum("chv,hvd->hcd", w_uv, w_o)
    return {k: v.astype(self.dtype) for k, v in
            dict(q_lat=q_lat, q_rope=w_q[..., self.dn:], o_lat=o_lat).items()}

  def decode(self, x_btd, ctx: PositionContext, cache: MLACache, pos):
    """t new tokens at positions pos .. pos+t-1 (ctx built for those positions) against the cache.

    Writes their latents into the cache and attends in latent space with absorbed weights; returns
    (y [B, t, D], cache). A prefill is decode of the whole prompt at pos 0."""
    w = self.absorbed()
    q_in = self._q_input(x_btd)
    q_lat = jnp.einsum("bti,ihc->bthc", q_in, w["q_lat"], preferred_element_type=jnp.float32)
    q_rope = rotate(jnp.einsum("bti,ihr->bthr", q_in, w["q_rope"]), ctx)
    c_btc, kr_btr = self._latent(x_btd, ctx)
    cache = MLACache(
        c_kv=jax.lax.dynamic_update_slice_in_dim(cache.c_kv, c_btc.astype(cache.c_kv.dtype), pos, axis=1),
        k_rope=jax.lax.dynamic_update_slice_in_dim(cache.k_rope, kr_btr.astype(cache.k_rope.dtype), pos, axis=1))
    t, s = x_btd.shape[1], cache.c_kv.shape[1]
    logits = (jnp.einsum("bthc,bsc->bhts", q_lat.astype(self.dtype), cache.c_kv, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, cache.k_rope, preferred_element_type=jnp.float32)) * self.scale
    q_pos, k_pos = pos + jnp.arange(t), jnp.arange(s)
    if ctx.bias is not None:
      logits = logits + ctx.bias.dense(q_pos, k_pos).astype(jnp.float32)
    logits = jnp.where(ops.visible(q_pos, k_pos, s, self.window), logits, ops.MASKED)  # hides unwritten slots
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o_lat = jnp.einsum("bhts,bsc->bthc", probs, cache.c_kv, preferred_element_type=jnp.float32)
    y_btd = jnp.einsum("bthc,hcd->btd", o_lat.astype(self.dtype), w["o_lat"], preferred_element_type=jnp.float32)
    return y_btd.astype(self.dtype), cache


# ------------------------------------------------------------------------------------------- whole decoder
def init_model_cache(model, batch: int, max_len: int) -> MLACache:
  """Zero cache for every layer of a Transformer built with attention.kind='mla': [L, B, S, dc] and [L, B, S, dr]."""
  if model.scan_layers:
    attn = model.blocks.attn
    dc, dr, dt = attn.dc, attn.dr, attn.dtype
  else:
    a = model.blocks[0].attn
    dc, dr, dt = a.dc, a.dr, a.dtype
  n = model.num_layers
  return MLACache(c_kv=jnp.zeros((n, batch, max_len, dc), dt), k_rope=jnp.zeros((n, batch, max_len, dr), dt))


def decode_step(model, tokens_bt, cache: MLACache, pos):
  """Logits [B, t, vocab] for tokens at positions pos .. pos+t-1 given the cache of the earlier ones, and the
  updated cache: the Transformer's forward with every layer's attention through `MLA.decode`."""
  t = tokens_bt.shape[1]
  positions_bt = jnp.broadcast_to(pos + jnp.arange(t), tokens_bt.shape)
  x_btd = model.position.embed(model.embed(tokens_bt), positions_bt)
  ctx = model.position.context(positions_bt)

  def layer(block, x, cache_l):
    a, cache_l = block.attn.decode(block.attn_norm(x), ctx, cache_l, pos)
    x = x + a
    y, _ = block.ffn(block.ffn_norm(x))
    return x + y, cache_l

  if model.scan_layers:
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
    def layers(block, x, cache_l):
      return layer(block, x, cache_l)
    x_btd, cache = layers(model.blocks, x_btd, cache)
  else:
    per_layer = []
    for i, block in enumerate(model.blocks):
      x_btd, c = layer(block, x_btd, jax.tree.map(lambda a: a[i], cache))
      per_layer.append(c)
    cache = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return model.embed.attend(model.final_norm(x_btd)), cache
