"""Softmax cross-entropy over rows of logits in one Pallas kernel (Triton lowering on GPU, interpret mode elsewhere).

For each row r of logits x [R, V] with target y_r and weight m_r (the token mask), `softmax_xent` returns

  lse_r     = log(sum_v exp(x_rv))                       fp32
  target_r  = x_r[y_r]                                   fp32
  dlogits_r = (softmax(x_r) - onehot(y_r)) * m_r          in `out_dtype`

so the token loss is (lse - target) * m and dlogits is its gradient. The loss (train/loss.py, `train.loss_impl=
pallas`) calls it on each chunk's logits; there XLA spends two kernels on the same work: a one-pass log-sum-exp
(a variadic reduction that evaluates two exponentials an element, so on bf16 logits it is bound by them, not by
memory) and the dlogits pass. On a Qwen2.5-0.5B step on an H200 those took 8.1 and 6.3 ms (benchmarks/RESULTS.md,
session 10).

One program per row streams the row twice in tiles of `block_v` columns:
  pass 1: a running max and a sum of exp rescaled once per tile (one exponential an element), and the target's
          logit (the tile that holds column y_r contributes it);
  pass 2: exp(x - lse) minus the one-hot, times m_r, stored in out_dtype.
So HBM sees two reads of the logits and one write of dlogits, where XLA reads them twice (or three times with a
two-pass log-sum-exp) besides. Pass 1 loads with evict_last and pass 2 loads and stores with evict_first, so the
row pass 2 reads is more often still in L2 (6 % faster on the 0.5B chunk on an H200: 2.27 against 2.41 ms,
benchmarks/RESULTS.md session 12; a persistent grid of one or two rows in flight per SM, to keep every row in L2
between its passes, was 1.4-2.3x slower: too few loads in flight per SM).
No array is padded: the last tile starts at V - block_v (it overlaps the one before, and only its new columns
count), so no load or store leaves the row; V >= block_v is required (the wrapper lowers block_v to the largest
power of two <= V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_FLOOR = float(jnp.finfo(jnp.float32).min)  # the running max's start: finite, so exp(start - start) is 1, not NaN


def _tile(j, v: int, bv: int):
  """Tile j's first column (the last tile is moved back to end at v) and the columns it owns (not seen before)."""
  c0 = jnp.minimum(j * bv, v - bv)
  cols = c0 + jnp.arange(bv, dtype=jnp.int32)
  return c0, cols, cols >= j * bv


def _xent_kernel(y_ref, m_ref, x_ref, lse_ref, tgt_ref, dx_ref, *, v: int, bv: int, evict: bool):
  """Both passes over this program's row. `evict`: pass 1's loads ask L2 to keep the row (evict_last), pass 2's
  loads and the dlogits stores to drop it (evict_first), so that pass 2 can find the row still in L2."""
  r = pl.program_id(0)
  y = y_ref[r]
  tiles = pl.cdiv(v, bv)
  keep, drop = ("evict_last", "evict_first") if evict else (None, None)

  def stats(j, carry):
    mx, s, t = carry
    c0, cols, own = _tile(j, v, bv)
    x = plgpu.load(x_ref.at[r, pl.ds(c0, bv)], eviction_policy=keep).astype(jnp.float32)
    x = jnp.where(own, x, -jnp.inf)
    new = jnp.maximum(mx, jnp.max(x))
    s = s * jnp.exp(mx - new) + jnp.sum(jnp.exp(x - new))
    t = t + jnp.sum(jnp.where((cols == y) & own, x, 0.0))
    return new, s, t

  mx, s, t = lax.fori_loop(0, tiles, stats, (jnp.float32(_FLOOR), jnp.float32(0), jnp.float32(0)))
  lse = mx + jnp.log(s)
  lse_ref[r] = lse
  tgt_ref[r] = t
  weight = m_ref[r]

  def grads(j, carry):
    c0, cols, own = _tile(j, v, bv)
    x = plgpu.load(x_ref.at[r, pl.ds(c0, bv)], eviction_policy=drop).astype(jnp.float32)
    d = (jnp.exp(x - lse) - jnp.where(cols == y, 1.0, 0.0)) * weight
    plgpu.store(dx_ref.at[r, pl.ds(c0, bv)], d.astype(dx_ref.dtype), mask=own, eviction_policy=drop)
    return carry

  lax.fori_loop(0, tiles, grads, 0)


def reference(logits_rv, targets_r, weights_r, *, out_dtype=None):
  """softmax_xent's outputs in jnp (fp32 arithmetic): the kernel's reference, and its stand-in when interpreted
  inside a shard_map."""
  x = logits_rv.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  tgt = jnp.take_along_axis(x, targets_r[:, None].astype(jnp.int32), axis=-1)[:, 0]
  onehot = jax.nn.one_hot(targets_r, x.shape[-1], dtype=jnp.float32)
  d = (jnp.exp(x - lse[:, None]) - onehot) * weights_r.astype(jnp.float32)[:, None]
  return lse, tgt, d.astype(out_dtype or logits_rv.dtype)


def softmax_xent(logits_rv, targets_r, weights_r, *, out_dtype=None, block_v: int = 2048, num_warps: int = 4,
                 num_stages: int = 1, evict: bool = True, interpret: bool | None = None):
  """(lse [R] fp32, target logit [R] fp32, dlogits [R, V] out_dtype (default: the logits' dtype)); see the module
  docstring. `weights_r` multiplies each row's dlogits (the token mask); targets must lie in [0, V).
  `block_v`, `num_warps`, `num_stages`: the tile width and Triton's launch parameters (the defaults measured
  fastest at the 0.5B chunk on an H200, benchmarks/RESULTS.md session 11). `evict`: the L2 eviction hints of
  `_xent_kernel` (measured 6 % faster on that chunk, session 12)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if logits_rv.ndim != 2 or targets_r.shape != logits_rv.shape[:1] or weights_r.shape != logits_rv.shape[:1]:
    raise ValueError(f"softmax_xent needs logits [R, V] with targets and weights [R]: got {logits_rv.shape}, "
                     f"{targets_r.shape}, {weights_r.shape}")
  if block_v < 1 or block_v & (block_v - 1):
    raise ValueError(f"block_v={block_v} must be a power of two")
  r, v = logits_rv.shape
  bv = min(block_v, 1 << (v.bit_length() - 1))  # a power of two <= V
  mat = jax.typeof(logits_rv).manual_axis_type  # which shard_map axes the rows vary over (none outside one)
  out_dtype = jnp.dtype(out_dtype or logits_rv.dtype)
  if interpret and mat.varying:
    # Pallas' interpreter inside a shard_map mixes the rows' per-device values with its own replicated indices,
    # which the varying-axes check rejects: off the GPU, per device, the same math in jnp.
    return reference(logits_rv, targets_r, weights_r, out_dtype=out_dtype)
  return pl.pallas_call(
      functools.partial(_xent_kernel, v=v, bv=bv, evict=evict),
      out_shape=(jax.ShapeDtypeStruct((r,), jnp.float32, manual_axis_type=mat),
                 jax.ShapeDtypeStruct((r,), jnp.float32, manual_axis_type=mat),
                 jax.ShapeDtypeStruct((r, v), out_dtype, manual_axis_type=mat)),
      grid=(r,),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="softmax_xent",
  )(targets_r.astype(jnp.int32), weights_r.astype(jnp.float32), logits_rv)
