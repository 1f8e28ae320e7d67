"""Flash attention in Pallas, forward and backward (custom VJP), GQA-native, causal, windowed, in-kernel biases.

Layout (as models/attention/ops.py): q [B, T, H, Dqk], k [B, S, K, Dqk], v [B, S, K, Dv], H = K * G. Query i sits
at position q_offset + i, key j at j; query i sees key j iff j <= q_offset + i, j < S and (window = 0 or
j > q_offset + i - window).

GQA-native: the wrapper lays the G query heads of a K/V head side by side as rows, q_f [B, K, T*G, Dqk] with
row r = t*G + g, so one tile's M dimension holds queries of the whole group and each K/V tile is loaded once per
group (the "MQA as long MHA" trick). A row's position is q_offset + r // G and its head k*G + r % G.

Kernels (grid (B, K, blocks), fp32 accumulation, softmax in base 2 with log2(e) folded into the scale):
  forward   row block x loop over the kv blocks it can see -> o, lse (base 2)
  dq        row block x the same kv loop -> dq, and the bias cotangent (linear: per row, summed over keys;
            near: the row block's d loss / d logit over its near keys, see below)
  dkv       kv block x loop over the row blocks that see it -> dk, dv (all G heads of the group accumulate in
            the M dimension, so no cross-head reduction is needed)
Loop bounds skip every kv (row) block that the causal / window mask hides completely; the mask is applied inside
the visited blocks only. T and S need not be multiples of the blocks: the wrapper pads rows and keys, padded keys
are masked by position (k < S), padded rows are sliced off (their output cotangent is zero).

Biases depend on the distance d = q_pos - k_pos only, with per-head coefficients:
  step    bias = sum_n [d >= thr_n] * coef[n, h]    (T5: thr from the bucket LUT, coef = table deltas per bucket)
  linear  bias = coef[0, h] * d                     (ALiBi: coef = -slope), evaluated in every visited block
A step bias is constant, c_h = sum_n coef[n, h], for every d >= D = max thr_n, and a per-row constant leaves the
softmax unchanged, so the kernel adds the shifted bias w[h, d] = bias - c_h (0 for d >= D; lse holds the shifted
logits, which only the backward reads, with the same bias). Far kv blocks (every pair d >= D) run the no-bias
code; only the few near blocks within D + block of the diagonal add a bias tile, loaded from a per-row-block
"strip" (precomputed outside from w: strip[rho, col] = w[head of row rho, d] for the key at column col) with a
dynamic column slice: no per-element threshold arithmetic, no gather. dq stores each near block's d loss / d logit
at the same columns, and autodiff outside maps the strip cotangent back to w, coef and the T5 table (exact: the
buckets come from the LUT, the sums are fp32). Row blocks i and i + P (P = G / gcd(block_q, G)) have the same
(head, position offset) pattern per row, so P strips serve all row blocks.

Head dims that are not powers of two (MLA's 192) are handled as power-of-two column chunks (192 = 128 + 64),
because the Triton lowering wants power-of-two tiles.

Backends: GPU = Pallas Triton lowering (CompilerParams(num_warps, num_stages)); TPU = Mosaic TPU with the same
block specs (grid dims parallel); CPU = interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2(MASKED - m) == 0 and never NaN


@dataclasses.dataclass(frozen=True)
class FlashParams:
  """Static (hashable) parameters of one flash-attention call."""
  scale: float
  window: int
  q_offset: int
  s_len: int  # real number of keys (before padding)
  groups: int  # G = H / K
  bias_kind: str | None  # None | "near" | "linear" (the wrapper turns "step" into "near")
  near: int  # near bias: D, the shifted bias is 0 for every d >= D
  phases: int  # near bias: P strips, row block i uses strip i % P
  block_q: int  # rows (query x group-head pairs) per tile
  block_k: int  # keys per tile
  num_warps: int
  num_stages: int
  interpret: bool
  backend: str


def _chunks(d: int) -> tuple[tuple[int, int], ...]:
  """(start, size) power-of-two column pieces of a head dim: 192 -> (0, 128), (128, 64)."""
  out, start = [], 0
  for bit in reversed(range(d.bit_length())):
    size = 1 << bit
    if d & size:
      out.append((start, size))
      start += size
  return tuple(out)


def _cdiv(a, b):
  return lax.div(a + b - 1, b)


def _load_cols(ref, rows, d):
  return [ref[rows, pl.ds(s, n)] for s, n in _chunks(d)]


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with fp32 accumulation; transposes folded into the contraction dims (Triton / Mosaic friendly)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _qk(q_cols, k_cols):
  """sum over column chunks of q_c @ k_c^T, fp32 [rows, keys]."""
  out = None
  for qc, kc in zip(q_cols, k_cols):
    part = _dot(qc, kc, trans_b=True)
    out = part if out is None else out + part
  return out


def _row_positions(p: FlashParams, r0):
  return p.q_offset + lax.div(r0 + jnp.arange(p.block_q, dtype=jnp.int32), p.groups)  # [bm]


def _mask(p: FlashParams, q_pos, k_pos):
  qi, kj = q_pos[:, None], k_pos[None, :]
  ok = (kj <= qi) & (kj < p.s_len)
  if p.window:
    ok &= kj > qi - p.window
  return ok


def _linear_bias(coef_col, dist):
  """[bm, bk] fp32 ALiBi bias from the per-row coefficient column [bm]."""
  return coef_col[:, None] * dist.astype(jnp.float32)


def _strip_shape(near: int, groups: int, block_q: int, block_k: int) -> tuple[int, int]:
  """(P, width) of the near-bias strips. Column 0 of a row block's strip is key q_lo - D + 1 - bk (q_lo: the
  block's first position); the width covers every key of its near kv blocks (rounded up to whole blocks)."""
  phases = groups // math.gcd(block_q, groups)
  span = max((r0 + block_q - 1) // groups - r0 // groups for r0 in range(0, phases * block_q, block_q)) + 1
  return phases, _round_up(span + near + 2 * block_k - 2, block_k)


def _strip_col(p: FlashParams, q_lo, c0):
  """Strip column of key c0 for the row block whose first position is q_lo."""
  return c0 - q_lo + p.near - 1 + p.block_k


def _logits2(p: FlashParams, q_cols, k_cols, bias_fn, q_pos, k_pos, masked: bool):
  """Base-2 logits with bias_fn(dist) added (when given) and the mask (on edge blocks only), the mask (None
  inside) and the distance grid."""
  s = _qk(q_cols, k_cols) * (p.scale * LOG2E)
  dist = q_pos[:, None] - k_pos[None, :]
  if bias_fn is not None:
    s = s + bias_fn(dist) * LOG2E
  if not masked:
    return s, None, dist
  mask = _mask(p, q_pos, k_pos)
  return jnp.where(mask, s, MASKED), mask, dist


def _kv_range(p: FlashParams, r0):
  """kv blocks for rows r0 .. r0+bm-1: [lo, hi) visible at all, [full_lo, full_hi) visible to every row (no mask)."""
  q_lo = p.q_offset + lax.div(r0, p.groups)
  q_hi = p.q_offset + lax.div(r0 + p.block_q - 1, p.groups)
  hi = jnp.minimum(_cdiv(q_hi + 1, p.block_k), -(-p.s_len // p.block_k))
  full_hi = jnp.minimum(lax.div(q_lo + 1, p.block_k), p.s_len // p.block_k)  # keys <= q_lo and < S throughout
  if not p.window:
    return 0, hi, 0, full_hi
  lo = lax.div(jnp.maximum(q_lo - p.window + 1, 0), p.block_k)
  full_lo = _cdiv(jnp.maximum(q_hi - p.window + 1, 0), p.block_k)  # keys inside every row's window
  return lo, hi, full_lo, full_hi


def _row_range(p: FlashParams, c0, num_row_blocks: int):
  """Row blocks for keys c0 .. c0+bk-1: [lo, hi) that see any of them, [full_lo, full_hi) that see all of them."""
  g, bm = p.groups, p.block_q
  lo = lax.div(jnp.maximum((c0 - p.q_offset) * g, 0), bm)
  full_lo = _cdiv(jnp.maximum((c0 + p.block_k - 1 - p.q_offset) * g, 0), bm)  # first row position >= last key
  full_lo = jnp.where(c0 + p.block_k > p.s_len, num_row_blocks, full_lo)  # padded keys: mask everywhere
  if not p.window:
    return lo, num_row_blocks, full_lo, num_row_blocks
  r_end = jnp.clip((c0 + p.block_k + p.window - 1 - p.q_offset) * g, 0, num_row_blocks * bm)
  full_hi = lax.div(jnp.maximum((c0 + p.window - p.q_offset) * g, 0), bm)  # last row position <= c0 + window - 1
  return lo, _cdiv(r_end, bm), full_lo, full_hi


def _segmented_loop(ranges, body, init):
  """fori_loop over [lo, hi) with the mask applied only outside [full_lo, full_hi) (edge blocks)."""
  lo, hi, full_lo, full_hi = ranges
  a = jnp.clip(full_lo, lo, hi)
  b = jnp.clip(full_hi, a, hi)
  carry = lax.fori_loop(lo, a, functools.partial(body, masked=True), init)
  carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
  return lax.fori_loop(b, hi, functools.partial(body, masked=True), carry)


def _unpipelined_loop(lo, hi, body, init):
  """fori_loop written as a while loop, which Triton does not software-pipeline. The near loop runs a few steps per
  program; pipelined, its loads (bias tile, K, V) get shared-memory stages on top of the far loops' (Triton 3.6,
  sm_90: dq 96 -> 128 KB, dkv 105 -> 120 KB per CTA, one CTA per SM instead of two)."""
  def step(state):
    i, carry = state
    return i + 1, body(i, carry)
  return lax.while_loop(lambda state: state[0] < hi, step, (lo, init))[1]


def _kv_loops(p: FlashParams, r0, body, init):
  """All visible kv blocks of rows r0 ..: body(j, carry, masked, biased). Near bias: the far blocks (every pair at
  distance >= D) first, unbiased, then the near ones, all masked (the diagonal blocks are among them) and biased."""
  ranges = _kv_range(p, r0)
  if p.bias_kind != "near":
    return _segmented_loop(ranges, functools.partial(body, biased=p.bias_kind == "linear"), init)
  lo, hi, full_lo, full_hi = ranges
  q_lo = p.q_offset + lax.div(r0, p.groups)
  near_lo = jnp.clip(lax.div(jnp.maximum(q_lo - p.near + 1, 0), p.block_k), lo, hi)  # first block with a key > q_lo - D
  carry = _segmented_loop((lo, near_lo, full_lo, full_hi), functools.partial(body, biased=False), init)
  return _unpipelined_loop(near_lo, hi, functools.partial(body, masked=True, biased=True), carry)


def _row_loops(p: FlashParams, c0, num_row_blocks: int, body, init):
  """All row blocks that see keys c0 ..: body(i, carry, masked, biased); near bias: the near ones (first position
  < c0 + bk - 1 + D) masked and biased, then the far ones unbiased."""
  ranges = _row_range(p, c0, num_row_blocks)
  if p.bias_kind != "near":
    return _segmented_loop(ranges, functools.partial(body, biased=p.bias_kind == "linear"), init)
  lo, hi, full_lo, full_hi = ranges
  x = c0 + p.block_k - 1 + p.near - p.q_offset  # row block i is near iff i*bm // G < x
  near_hi = jnp.clip(_cdiv(jnp.maximum(x, 0) * p.groups, p.block_q), lo, hi)
  carry = _unpipelined_loop(lo, near_hi, functools.partial(body, masked=True, biased=True), init)
  return _segmented_loop((near_hi, hi, full_lo, full_hi), functools.partial(body, biased=False), carry)


# ------------------------------------------------------------------------------------------------------ kernels


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, p: FlashParams, dqk: int, dv: int):
  bias_ref, o_ref, lse_ref = rest if p.bias_kind else (None, *rest)
  r0 = pl.program_id(2) * p.block_q
  q_pos = _row_positions(p, r0)
  q_cols = _load_cols(q_ref, slice(None), dqk)
  linear = functools.partial(_linear_bias, bias_ref[0, :]) if p.bias_kind == "linear" else None
  q_lo = p.q_offset + lax.div(r0, p.groups) if p.bias_kind == "near" else None
  bm = p.block_q

  def body(j, carry, masked, biased):
    m, l, accs = carry
    c0 = j * p.block_k
    keys = pl.ds(c0, p.block_k)
    k_pos = c0 + jnp.arange(p.block_k, dtype=jnp.int32)
    bias_fn = (linear or (lambda _: bias_ref[:, pl.ds(_strip_col(p, q_lo, c0), p.block_k)])) if biased else None
    s, _, _ = _logits2(p, q_cols, _load_cols(k_ref, keys, dqk), bias_fn, q_pos, k_pos, masked)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    probs = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(probs, axis=1)
    pv = probs.astype(v_ref.dtype)
    accs = tuple(a * alpha[:, None] + _dot(pv, vc) for a, vc in zip(accs, _load_cols(v_ref, keys, dv)))
    return m_new, l, accs

  init = (jnp.full((bm,), MASKED, jnp.float32), jnp.zeros((bm,), jnp.float32),
          tuple(jnp.zeros((bm, n), jnp.float32) for _, n in _chunks(dv)))
  m, l, accs = _kv_loops(p, r0, body, init)
  l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that sees no key (padding) stays finite
  for (start, n), acc in zip(_chunks(dv), accs):
    o_ref[:, pl.ds(start, n)] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, p: FlashParams, dqk: int, dv: int):
  if p.bias_kind == "near":
    bias_ref, _, dq_ref, dbias_ref = rest  # rest[1]: the zeros that dbias_ref aliases (columns never stored)
  else:
    bias_ref, dq_ref, dbias_ref = rest if p.bias_kind else (None, *rest, None)
  r0 = pl.program_id(2) * p.block_q
  q_pos = _row_positions(p, r0)
  q_cols = _load_cols(q_ref, slice(None), dqk)
  do_cols = _load_cols(do_ref, slice(None), dv)
  lse, delta = lse_ref[...], delta_ref[...]
  linear = functools.partial(_linear_bias, bias_ref[0, :]) if p.bias_kind == "linear" else None
  q_lo = p.q_offset + lax.div(r0, p.groups) if p.bias_kind == "near" else None
  bm = p.block_q

  def body(j, carry, masked, biased):
    dqs, dcs = carry
    c0 = j * p.block_k
    keys = pl.ds(c0, p.block_k)
    k_pos = c0 + jnp.arange(p.block_k, dtype=jnp.int32)
    k_cols = _load_cols(k_ref, keys, dqk)
    strip_cols = pl.ds(_strip_col(p, q_lo, c0), p.block_k) if p.bias_kind == "near" and biased else None
    bias_fn = (linear or (lambda _: bias_ref[:, strip_cols])) if biased else None
    s, mask, dist = _logits2(p, q_cols, k_cols, bias_fn, q_pos, k_pos, masked)
    probs = jnp.exp2(s - lse[:, None])
    probs = jnp.where(mask, probs, 0.0) if masked else probs
    dp = _qk(do_cols, _load_cols(v_ref, keys, dv))
    ds = probs * (dp - delta[:, None])  # d loss / d logit (natural units, bias included)
    dsk = ds.astype(k_ref.dtype)
    dqs = tuple(a + _dot(dsk, kc) for a, kc in zip(dqs, k_cols))
    if p.bias_kind == "linear":
      dcs = (dcs[0] + jnp.sum(ds * dist.astype(jnp.float32), axis=1),)
    elif biased:  # near blocks cover disjoint strip columns: each is stored once
      dbias_ref[:, strip_cols] = ds
    return dqs, dcs

  init = (tuple(jnp.zeros((bm, n), jnp.float32) for _, n in _chunks(dqk)),
          (jnp.zeros((bm,), jnp.float32),) if linear else ())
  dqs, dcs = _kv_loops(p, r0, body, init)
  for (start, n), acc in zip(_chunks(dqk), dqs):
    dq_ref[:, pl.ds(start, n)] = (acc * p.scale).astype(dq_ref.dtype)
  for n, c in enumerate(dcs):
    dbias_ref[n, :] = c


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, p: FlashParams, dqk: int, dv: int,
                num_row_blocks: int):
  bias_ref, dk_ref, dv_ref = rest if p.bias_kind else (None, *rest)
  c0 = pl.program_id(2) * p.block_k
  k_pos = c0 + jnp.arange(p.block_k, dtype=jnp.int32)
  k_cols = _load_cols(k_ref, slice(None), dqk)
  v_cols = _load_cols(v_ref, slice(None), dv)
  bk = p.block_k

  def bias_fn(r0, rows):
    if p.bias_kind == "linear":
      return functools.partial(_linear_bias, bias_ref[0, rows])
    q_lo = p.q_offset + lax.div(r0, p.groups)
    strip = lax.rem(lax.div(r0, p.block_q), p.phases)
    return lambda _: bias_ref[strip, :, pl.ds(_strip_col(p, q_lo, c0), bk)]

  def body(i, carry, masked, biased):
    dks, dvs = carry
    r0 = i * p.block_q
    rows = pl.ds(r0, p.block_q)
    q_pos = _row_positions(p, r0)
    q_cols = _load_cols(q_ref, rows, dqk)
    do_cols = _load_cols(do_ref, rows, dv)
    s, mask, _ = _logits2(p, q_cols, k_cols, bias_fn(r0, rows) if biased else None, q_pos, k_pos, masked)
    probs = jnp.exp2(s - lse_ref[rows][:, None])
    probs = jnp.where(mask, probs, 0.0) if masked else probs
    pd = probs.astype(do_ref.dtype)
    dvs = tuple(a + _dot(pd, dc, trans_a=True) for a, dc in zip(dvs, do_cols))
    dp = _qk(do_cols, v_cols)
    ds = (probs * (dp - delta_ref[rows][:, None])).astype(q_ref.dtype)
    dks = tuple(a + _dot(ds, qc, trans_a=True) for a, qc in zip(dks, q_cols))
    return dks, dvs

  init = (tuple(jnp.zeros((bk, n), jnp.float32) for _, n in _chunks(dqk)),
          tuple(jnp.zeros((bk, n), jnp.float32) for _, n in _chunks(dv)))
  dks, dvs = _row_loops(p, c0, num_row_blocks, body, init)
  for (start, n), acc in zip(_chunks(dqk), dks):
    dk_ref[:, pl.ds(start, n)] = (acc * p.scale).astype(dk_ref.dtype)
  for (start, n), acc in zip(_chunks(dv), dvs):
    dv_ref[:, pl.ds(start, n)] = acc.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------- pallas calls


def _compiler_params(p: FlashParams):
  if p.interpret:
    return None
  if p.backend == "gpu":
    return plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)
  if p.backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  return None


def _call(kernel, p: FlashParams, grid, in_specs, out_specs, out_shape, name, *args, aliases=None):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=_compiler_params(p), interpret=p.interpret, name=name,
                        input_output_aliases=aliases or {})(*args)


def _bias_spec(p: FlashParams, bias, per_row_block: bool):
  """BlockSpec of the bias input: linear [K, 1, Mp] coefficients by rows; near [K, P, bm, width] strips, the row
  block's own (per_row_block) or all P of the K/V head (the dkv kernel visits every row block)."""
  if p.bias_kind == "linear":
    if per_row_block:
      return pl.BlockSpec((None, 1, p.block_q), lambda b_, k_, i: (k_, 0, i))
    return pl.BlockSpec((None, 1, bias.shape[-1]), lambda b_, k_, j: (k_, 0, 0))
  width = bias.shape[-1]
  if per_row_block:
    return pl.BlockSpec((None, None, p.block_q, width), lambda b_, k_, i: (k_, lax.rem(i, p.phases), 0, 0))
  return pl.BlockSpec((None, p.phases, p.block_q, width), lambda b_, k_, j: (k_, 0, 0, 0))


def _row_spec(d):  # [B, K, M, d] tiled by rows
  return lambda bm: pl.BlockSpec((None, None, bm, d), lambda b, k, i: (b, k, i, 0))


def _fwd(p: FlashParams, q_f, k_p, v_p, bias):
  b, kvh, mp, dqk = q_f.shape
  sp, dv = k_p.shape[1], v_p.shape[-1]
  bm = p.block_q
  in_specs = [pl.BlockSpec((None, None, bm, dqk), lambda b_, k_, i: (b_, k_, i, 0)),
              pl.BlockSpec((None, sp, None, dqk), lambda b_, k_, i: (b_, 0, k_, 0)),
              pl.BlockSpec((None, sp, None, dv), lambda b_, k_, i: (b_, 0, k_, 0))]
  args = [q_f, k_p, v_p]
  if p.bias_kind:
    in_specs.append(_bias_spec(p, bias, per_row_block=True))
    args.append(bias)
  out_specs = [pl.BlockSpec((None, None, bm, dv), lambda b_, k_, i: (b_, k_, i, 0)),
               pl.BlockSpec((None, None, bm), lambda b_, k_, i: (b_, k_, i))]
  out_shape = [jax.ShapeDtypeStruct((b, kvh, mp, dv), q_f.dtype), jax.ShapeDtypeStruct((b, kvh, mp), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, p=p, dqk=dqk, dv=dv)
  return _call(kernel, p, (b, kvh, mp // bm), in_specs, out_specs, out_shape, "flash_fwd", *args)


def _bwd(p: FlashParams, q_f, k_p, v_p, bias, o_f, lse, do_f):
  b, kvh, mp, dqk = q_f.shape
  sp, dv = k_p.shape[1], v_p.shape[-1]
  bm, bk = p.block_q, p.block_k
  delta = jnp.sum(o_f.astype(jnp.float32) * do_f.astype(jnp.float32), axis=-1)  # [B, K, Mp]

  # dq (+ bias cotangent): row blocks, whole K/V resident.
  row = lambda d: pl.BlockSpec((None, None, bm, d), lambda b_, k_, i: (b_, k_, i, 0))  # noqa: E731
  row_vec = pl.BlockSpec((None, None, bm), lambda b_, k_, i: (b_, k_, i))
  kv_all = lambda d: pl.BlockSpec((None, sp, None, d), lambda b_, k_, i: (b_, 0, k_, 0))  # noqa: E731
  in_specs = [row(dqk), kv_all(dqk), kv_all(dv), row(dv), row_vec, row_vec]
  args = [q_f, k_p, v_p, do_f, lse, delta]
  out_specs = [row(dqk)]
  out_shape = [jax.ShapeDtypeStruct(q_f.shape, q_f.dtype)]
  aliases = None
  if p.bias_kind:
    in_specs.append(_bias_spec(p, bias, per_row_block=True))
    args.append(bias)
  if p.bias_kind == "linear":
    out_specs.append(pl.BlockSpec((None, None, 1, bm), lambda b_, k_, i: (b_, k_, 0, i)))
    out_shape.append(jax.ShapeDtypeStruct((b, kvh, 1, mp), jnp.float32))
  elif p.bias_kind == "near":  # d loss / d logit at each row's strip columns, 0 where no near block stored
    width = bias.shape[-1]
    in_specs.append(row(width))
    args.append(jnp.zeros((b, kvh, mp, width), jnp.float32))
    out_specs.append(row(width))
    out_shape.append(jax.ShapeDtypeStruct((b, kvh, mp, width), jnp.float32))
    aliases = {len(args) - 1: 1}
  outs = _call(functools.partial(_dq_kernel, p=p, dqk=dqk, dv=dv), p, (b, kvh, mp // bm), in_specs, out_specs,
               out_shape, "flash_bwd_dq", *args, aliases=aliases)
  dq_f = outs[0]
  dbias = None
  if p.bias_kind == "linear":
    dbias = jnp.sum(outs[1], axis=0)  # [K, 1, Mp]: shared across the batch
  elif p.bias_kind == "near":  # row block i used strip i % P: sum over the batch and over the blocks of each strip
    nrb = mp // bm
    d_rows = _pad_axis(jnp.sum(outs[1], axis=0).reshape(kvh, nrb, bm, -1), 1, _round_up(nrb, p.phases))
    dbias = jnp.sum(d_rows.reshape(kvh, -1, p.phases, bm, d_rows.shape[-1]), axis=1)

  # dk, dv: kv blocks, all rows of the group resident.
  rows_all = lambda d: pl.BlockSpec((None, None, mp, d), lambda b_, k_, j: (b_, k_, 0, 0))  # noqa: E731
  rows_vec = pl.BlockSpec((None, None, mp), lambda b_, k_, j: (b_, k_, 0))
  kv_blk = lambda d: pl.BlockSpec((None, bk, None, d), lambda b_, k_, j: (b_, j, k_, 0))  # noqa: E731
  in_specs = [rows_all(dqk), kv_blk(dqk), kv_blk(dv), rows_all(dv), rows_vec, rows_vec]
  args = [q_f, k_p, v_p, do_f, lse, delta]
  if p.bias_kind:
    in_specs.append(_bias_spec(p, bias, per_row_block=False))
    args.append(bias)
  kernel = functools.partial(_dkv_kernel, p=p, dqk=dqk, dv=dv, num_row_blocks=mp // bm)
  dk_p, dv_p = _call(kernel, p, (b, kvh, sp // bk), in_specs, [kv_blk(dqk), kv_blk(dv)],
                     [jax.ShapeDtypeStruct(k_p.shape, k_p.dtype), jax.ShapeDtypeStruct(v_p.shape, v_p.dtype)],
                     "flash_bwd_dkv", *args)
  return dq_f, dk_p, dv_p, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(p: FlashParams, q_f, k_p, v_p, bias):
  return _fwd(p, q_f, k_p, v_p, bias)[0]


def _flash_core_fwd(p, q_f, k_p, v_p, bias):
  o_f, lse = _fwd(p, q_f, k_p, v_p, bias)
  return o_f, (q_f, k_p, v_p, bias, o_f, lse)


def _flash_core_bwd(p, res, do_f):
  q_f, k_p, v_p, bias, o_f, lse = res
  return _bwd(p, q_f, k_p, v_p, bias, o_f, lse, do_f)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# ------------------------------------------------------------------------------------------------------ wrapper


def _pad_axis(x, axis: int, size: int):
  extra = size - x.shape[axis]
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _near_strips(thresholds: tuple[int, ...], coef_nh, kvh: int, g: int, block_q: int, block_k: int):
  """Step bias -> (D, P, strips [K, P, bm, width] fp32) of the near form (module docstring), or None when no
  threshold is > 0 (the bias is then one constant per head: no effect). Strip p serves row blocks i = p mod P:
  strips[k, p, rho, col] = w[k*G + head(rho), d] with d = u(rho) + D - 1 + bk - col the distance from row rho
  (u: its position offset in the block) to the key of column col; 0 outside 0 <= d < D."""
  near = max(thresholds, default=0)
  if near <= 0:
    return None
  # w[h, d] = bias(d) - bias(D) = -sum of the coefficients of the thresholds still ahead (thr_n > d)
  ahead_dn = np.arange(near)[:, None] < np.asarray(thresholds)[None, :]
  w_hd = -jnp.sum(jnp.where(ahead_dn[:, :, None], coef_nh[None], 0.0), axis=1).T
  w_kgd = jnp.pad(w_hd, ((0, 0), (0, 1))).reshape(kvh, g, near + 1)  # index D: 0 (far, and the fill value)
  phases, width = _strip_shape(near, g, block_q, block_k)
  r0 = np.arange(phases)[:, None, None] * block_q
  rows = r0 + np.arange(block_q)[None, :, None]  # [P, bm, 1]
  dist = (rows // g - r0 // g) + near - 1 + block_k - np.arange(width)  # [P, bm, width]
  dist = np.where((dist >= 0) & (dist < near), dist, near)
  return near, phases, w_kgd[:, rows % g, dist]


def flash_attention(q, k, v, *, scale: float | None = None, window: int = 0, q_offset: int = 0,
                    bias_kind: str | None = None, bias_thresholds: tuple[int, ...] = (), bias_coef_nh=None,
                    block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                    interpret: bool | None = None, backend: str | None = None):
  """Causal flash attention; returns [B, T, H, Dv] in q's dtype. Differentiable in q, k, v and bias_coef_nh.

  bias_kind "step": logits[h, i, j] += sum_n [d >= bias_thresholds[n]] * bias_coef_nh[n, h] with d = q_pos - k_pos
  (evaluated in the near form, equal up to a per-head constant, which softmax ignores);
  "linear": logits[h, i, j] += bias_coef_nh[0, h] * d. block_q counts rows of the flattened (query, group head)
  axis, so a tile holds block_q / G query positions of all G heads of one K/V head.
  """
  b, t, h, dqk = q.shape
  s, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
  if h % kvh:
    raise ValueError(f"{h} query heads are not a multiple of {kvh} K/V heads")
  if k.shape[-1] != dqk or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
  if bias_kind not in (None, "step", "linear"):
    raise ValueError(f"bias_kind={bias_kind!r}: use None, 'step' or 'linear'")
  g = h // kvh
  backend = backend or jax.default_backend()
  interpret = (backend not in ("gpu", "tpu")) if interpret is None else interpret
  scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
  block_k = min(block_k, max(16, pl.next_power_of_2(s)))
  block_q = min(block_q, max(16, pl.next_power_of_2(t * g)))
  mp, sp = _round_up(t * g, block_q), _round_up(s, block_k)
  bias, near, phases = None, 0, 1
  if bias_kind == "linear":
    coef_nh = jnp.asarray(bias_coef_nh, jnp.float32)
    # Per row r = t*G + g of K/V head k: the coefficient of head k*G + g -> [K, 1, Mp].
    bias = _pad_axis(jnp.tile(coef_nh.reshape(1, kvh, g).transpose(1, 0, 2), (1, 1, t)), 2, mp)
  elif bias_kind == "step":
    thresholds, coef_nh = tuple(int(x) for x in bias_thresholds), jnp.asarray(bias_coef_nh, jnp.float32)
    if coef_nh.shape[0] != len(thresholds):
      raise ValueError(f"{coef_nh.shape[0]} step coefficients for {len(thresholds)} thresholds")
    strips = _near_strips(thresholds, coef_nh, kvh, g, block_q, block_k)
    if strips is None:  # a constant bias: nothing to add
      bias_kind = None
    else:
      bias_kind, (near, phases, bias) = "near", strips
  p = FlashParams(scale=scale, window=int(window), q_offset=int(q_offset), s_len=s, groups=g, bias_kind=bias_kind,
                  near=near, phases=phases, block_q=block_q, block_k=block_k, num_warps=num_warps,
                  num_stages=num_stages, interpret=interpret, backend=backend)

  q_f = q.reshape(b, t, kvh, g, dqk).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, dqk)
  q_f = _pad_axis(q_f, 2, mp)
  k_p, v_p = _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
  o_f = _flash_core(p, q_f, k_p, v_p, bias)
  o = o_f[:, :, :t * g].reshape(b, kvh, t, g, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dv)
  return o
