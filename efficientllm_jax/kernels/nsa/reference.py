"""Dense pure-jnp references for the NSA kernels (same signatures as kernel.py; small shapes only: they build
[B, H, T, Nc] and [B, H, T, T] arrays). fp32 logits and softmax; rows that see nothing give zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _softmax_lse(logits, mask):
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  s = jnp.sum(e, axis=-1, keepdims=True)
  lse = jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), jnp.inf)[..., 0]
  return e / jnp.where(s > 0, s, 1.0), lse


def _grouped(q_bthd, kv: int):
  b, t, h, d = q_bthd.shape
  return q_bthd.reshape(b, t, kv, h // kv, d)


def compressed_attention(q_bthd, kc_bnkd, vc_bnkd, *, compress_block: int, compress_stride: int,
                         scale: float | None = None, blocks=None):
  """-> (o [B, T, H, D], lse [B, K, G, T]); query t sees compressed token c when c*d + l - 1 <= t."""
  del blocks
  b, t, h, d = q_bthd.shape
  kv = kc_bnkd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  logits = jnp.einsum("btkgd,bnkd->bkgtn", _grouped(q_bthd, kv), kc_bnkd, preferred_element_type=jnp.float32)
  ends = jnp.arange(kc_bnkd.shape[1]) * compress_stride + compress_block - 1
  p, lse = _softmax_lse(logits * scale, ends[None, :] <= jnp.arange(t)[:, None])
  o = jnp.einsum("bkgtn,bnkd->btkgd", p, vc_bnkd.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q_bthd.dtype), jax.lax.stop_gradient(lse)


def selection_scores(q_bthd, kc_bnkd, lse_bkgt, *, compress_block: int, compress_stride: int, select_block: int,
                     scale: float | None = None, blocks=None):
  """[B, K, T, S]: exp(q.kc * scale - lse) summed over the group's heads, times the overlap (in strides) of
  compressed token c (tokens [c*d, c*d + l)) with selection block s (tokens [s*l', (s+1)*l'))."""
  del blocks
  q_bthd, kc_bnkd, lse_bkgt = map(jax.lax.stop_gradient, (q_bthd, kc_bnkd, lse_bkgt))
  b, t, h, d = q_bthd.shape
  nc, kv = kc_bnkd.shape[1], kc_bnkd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  logits = jnp.einsum("btkgd,bnkd->bkgtn", _grouped(q_bthd, kv), kc_bnkd, preferred_element_type=jnp.float32)
  ends = jnp.arange(nc) * compress_stride + compress_block - 1
  visible = ends[None, :] <= jnp.arange(t)[:, None]
  p = jnp.where(visible, jnp.exp(logits * scale - lse_bkgt[..., None]), 0.0).sum(2)  # [B, K, T, Nc]
  ns = -(-t // select_block)
  tok = np.arange(nc)[:, None] * compress_stride + np.arange(compress_block)[None, :]  # [Nc, l]
  w = np.zeros((nc, ns), np.float32)
  np.add.at(w, (np.repeat(np.arange(nc), compress_block), (tok // select_block).ravel()), 1.0 / compress_stride)
  return jnp.einsum("bktn,ns->bkts", p, jnp.asarray(w), precision=jax.lax.Precision.HIGHEST)


def selected_attention(q_bthd, ks_bskd, vs_bskd, idx_bktn, *, select_block: int, scale: float | None = None,
                       blocks=None):
  """Dense masked attention: token t sees key p when p <= t and block p // l' is among idx[b, k, t] (-1 unused)."""
  del blocks
  b, t, h, d = q_bthd.shape
  kv = ks_bskd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  key_block = jnp.arange(t) // select_block
  picked = jnp.any(idx_bktn[..., None] == key_block[None, None, None, None, :], axis=-2)  # [B, K, T, S=T]
  mask = picked & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])
  logits = jnp.einsum("btkgd,bskd->bkgts", _grouped(q_bthd, kv), ks_bskd, preferred_element_type=jnp.float32)
  p, _ = _softmax_lse(logits * scale, mask[:, :, None])
  o = jnp.einsum("bkgts,bskd->btkgd", p, vs_bskd.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q_bthd.dtype)
