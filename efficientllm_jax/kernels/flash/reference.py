"""Pure-jnp reference for the flash kernel: dense fp32 logits [B, H, T, S], the same mask and bias definitions.

Independent of the kernel's tiling, row flattening, base-2 softmax and near-bias strips: the bias is evaluated
here by a direct per-(query, key) formula, the step bias from the thresholds every distance has passed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def reference_attention(q, k, v, *, scale: float | None = None, window: int = 0, q_offset: int = 0,
                        bias_kind: str | None = None, bias_thresholds=(), bias_coef_nh=None):
  """q [B, T, H, Dqk], k [B, S, K, Dqk], v [B, S, K, Dv] -> [B, T, H, Dv] (q's dtype); see kernel.flash_attention."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  k_h = jnp.repeat(k, h // kvh, axis=2).astype(jnp.float32)  # query head h uses K/V head h // G
  v_h = jnp.repeat(v, h // kvh, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_h) * scale
  qi = q_offset + jnp.arange(t)[:, None]
  kj = jnp.arange(s)[None, :]
  dist = qi - kj  # [t, s]
  if bias_kind == "linear":
    logits = logits + bias_coef_nh[0][None, :, None, None] * dist.astype(jnp.float32)
  elif bias_kind == "step":
    # bucket n = number of thresholds passed minus one; the step coefficients are the bucket deltas
    thr = jnp.asarray(bias_thresholds)
    passed = (dist[..., None] >= thr).astype(jnp.float32)  # [t, s, n]
    logits = logits + jnp.einsum("tsn,nh->hts", passed, bias_coef_nh.astype(jnp.float32))[None]
  ok = (kj <= qi) & (kj < s)
  if window:
    ok &= kj > qi - window
  logits = jnp.where(ok, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v_h).astype(q.dtype)
