"""The one attention-core dispatch: which kernel computes softmax(q k^T * scale + bias) v.

Variants (gqa.py, mla.py, ...) build q/k/v; `attention()` picks the kernel by `impl`:
  xla    plain einsum reference (any platform, any shape, biases)
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"), is_causal=True (+ local_window_size), never a
         dense mask
  auto   cudnn on GPU where it applies, else xla
Layouts: q [B, T, H, Dqk], k [B, S, K, Dqk], v [B, S, K, Dv] with H % K == 0 (GQA groups share a K/V head).
A logit bias (relative / ALiBi positions) is passed as an object with `dense(q_pos [t], k_pos [s]) -> [H, t, s]`
fp32, so a kernel may evaluate it tile by tile instead of receiving a dense tensor.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

_logged: set[str] = set()


def _log_once(msg: str) -> None:
  if msg not in _logged:
    _logged.add(msg)
    logging.info(msg)


def causal_mask(t: int, s: int, window: int = 0, offset: int = 0):
  """[t, s] bool, True where query i (at absolute position offset + i) may see key j."""
  qi = jnp.arange(t)[:, None] + offset
  kj = jnp.arange(s)[None, :]
  ok = kj <= qi
  if window:
    ok &= kj > qi - window
  return ok


def xla_attention(q, k, v, *, scale: float, bias=None, window: int = 0, causal: bool = True, q_offset: int = 0):
  """Reference: fp32 logits and softmax, GQA via a group axis (K/V are never repeated)."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  qg = q.reshape(b, t, kvh, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    b_hts = bias.dense(jnp.arange(t) + q_offset, jnp.arange(s))
    logits = logits + b_hts.reshape(kvh, g, t, s).astype(jnp.float32)
  if causal:
    logits = jnp.where(causal_mask(t, s, window, q_offset), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def cudnn_attention(q, k, v, *, scale: float, window: int = 0):
  kw = dict(local_window_size=(window - 1, 0)) if window else {}
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn", **kw)


def cudnn_supports(q, k, v, bias) -> str | None:
  """None if cuDNN can run this call, else the reason it cannot."""
  if jax.default_backend() != "gpu":
    return f"platform is {jax.default_backend()}, not gpu"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN flash attention needs bf16/fp16)"
  if q.shape[-1] != v.shape[-1]:
    return f"q/k head dim {q.shape[-1]} differs from v head dim {v.shape[-1]}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"head dim {q.shape[-1]} (cuDNN needs a multiple of 8, at most 128)"
  if bias is not None:
    return "a logit bias (would need a dense [B,H,T,S] tensor)"
  return None


def attention(q, k, v, *, impl: str = "auto", scale: float | None = None, bias=None, window: int = 0):
  """Causal attention over [B, T, H, D] queries; returns [B, T, H, Dv] in q's dtype."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if impl in ("auto", "cudnn"):
    reason = cudnn_supports(q, k, v, bias)
    if reason is None:
      return cudnn_attention(q, k, v, scale=scale, window=window)
    if impl == "cudnn":
      raise ValueError(f"attention.impl='cudnn' cannot run this call: {reason}; use attention.impl=auto or xla")
    _log_once(f"attention: xla path ({reason})")
  return xla_attention(q, k, v, scale=scale, bias=bias, window=window)
