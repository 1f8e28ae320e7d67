"""Cross-entropy over the tied LM head without materialising [tokens, vocab] fp32 logits at once.

Tokens are processed in chunks of `chunk`; each chunk's logits are computed in the compute dtype with fp32
accumulation and rematerialised in the backward pass, so peak logits memory is chunk x vocab x 4 bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss(h_nd, embed_vd, targets_n, mask_n):
  logits = jnp.einsum("nd,vd->nv", h_nd, embed_vd.astype(h_nd.dtype), preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_n[:, None], axis=-1)[:, 0]
  return jnp.sum((lse - tgt) * mask_n)


def cross_entropy(h_btd, embed_vd, targets_bt, mask_bt=None, *, chunk: int = 0):
  """Returns (sum of token losses, number of tokens counted), both fp32 scalars."""
  d = h_btd.shape[-1]
  h_nd = h_btd.reshape(-1, d)
  targets_n = targets_bt.reshape(-1)
  mask_n = jnp.ones_like(targets_n, jnp.float32) if mask_bt is None else mask_bt.reshape(-1).astype(jnp.float32)
  n = h_nd.shape[0]
  if not chunk or chunk >= n:
    return _chunk_loss(h_nd, embed_vd, targets_n, mask_n), jnp.sum(mask_n)
  pad = (-n) % chunk
  if pad:  # padded rows carry mask 0
    h_nd = jnp.pad(h_nd, ((0, pad), (0, 0)))
    targets_n = jnp.pad(targets_n, (0, pad))
    mask_n = jnp.pad(mask_n, (0, pad))
  k = h_nd.shape[0] // chunk
  body = jax.checkpoint(lambda carry, xs: (carry + _chunk_loss(xs[0], embed_vd, xs[1], xs[2]), None))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (h_nd.reshape(k, chunk, d), targets_n.reshape(k, chunk), mask_n.reshape(k, chunk)))
  return total, jnp.sum(mask_n)
