"""Pallas (Triton lowering) kernels for NSA's compressed and selected branches, forward and backward.

Layout. A GQA group's queries are processed together: q [B, T, H, D] becomes rows [B, K, T' * Gp, D] ordered
(token, head) with the group's G heads padded to Gp = next power of two (Triton tiles are powers of two) and T
padded to T' (a multiple of the query tile). A query tile of `tq` tokens is then tq * Gp contiguous rows: the
M dimension of every matmul holds all heads of the group, so each key tile is loaded once per group.

One block-sparse flash-attention core serves both branches; they differ in the keys and the mask:
  cmp  keys = compressed tokens (tile of `cmp_k`); token t sees compressed token c when c*d + l - 1 <= t.
  slc  keys = raw tokens, one key tile = one selection block of l'; token t sees block j when j is among its n
       selected blocks (per-row membership, from the block ids) and, inside the block, keys <= t.
Which key tiles a query tile visits is a list per query tile (count + ids); the backward for dk/dv walks the
inverted list (the query tiles that touch a key tile) cut into work items of at most `*_chunk` query tiles, one
program per item, each adding its fp32 dk/dv into the key tile with atomics (the summation order, so the last
bits, may differ run to run). A key tile that every query tile uses (the forced first selection block, the first
compressed tile) thus spreads over many programs instead of being one long serial tail (at 64K the selected
branch's dk/dv went 6.25 -> 2.41 ms). For cmp the lists are static (numpy, from the geometry); for slc they come
from the selected ids in XLA: a [B, K, T'/tq, S] bitmap (query tile uses block) compacted per row with a cumsum
scatter, and its transpose.
Cost of the union: a query tile visits every block any of its tokens picked (first + local blocks are shared by
all tokens of a tile inside one selection block; free picks may differ), and the rows that did not pick a block
are masked, so compute is (union size / n) times the strict per-token work while loads are shared.

Selection. One program per query tile loops over the selection tiles up to its own block: it recomputes the
compressed probabilities p = exp(s - lse) of one compressed tile at a time, sums them over the group's heads, and
remaps them to selection blocks with two small constant matrices (compressed tile jt feeds selection tiles jt and
jt + 1 only, because a tile of `cmp_k` compressed tokens spans exactly cmp_k * d / l' selection blocks).
`select_top` merges each selection tile into a running top-n in registers, so only the [B, K, T, n] ids reach HBM
(`selection_scores` writes the [B, K, T, S] scores instead, for tests and inspection); never [B, H, T, T / d].

Numerics: bf16 (or fp32) inputs, fp32 logits / softmax / accumulators; lse is +inf for rows that see nothing
(their probabilities are exactly 0, no NaN).
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
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two) and Triton knobs; interpret None = interpret unless the backend is a GPU."""
  # Query tokens per tile (rows = tokens * Gp, raised to >= 16 rows). Measured at 64K on an H200 (12/2 heads,
  # benchmarks/RESULTS.md): NSA fwd+bwd 45.0 ms with cmp_q=16, slc_q=16; 37.6 with slc_q=8 (a selected-branch
  # tile visits the union of its tokens' blocks); 28.5 with cmp_q=8 as well; 19.1 with the fused top-n and the
  # dk/dv work items below (cmp_chunk 64-256 within 0.3 ms; slc_chunk 16 +0.9 ms, 64 +0.2 ms; slc_q 4 +1.4 ms).
  cmp_q: int = 8  # compressed branch
  cmp_k: int = 64  # compressed tokens per key tile; cmp_k * stride must be a multiple of select_block
  slc_q: int = 8  # selected branch (key tile = one selection block)
  cmp_chunk: int = 128  # most query tiles per dk/dv program (work item) of a compressed key tile
  slc_chunk: int = 32  # most query tiles per dk/dv program of a selection block (block 0: every query tile's)
  dkdv_items: int = 1024  # chunks shrink (to 1) until a (batch, kv head) has about this many dk/dv work items
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool | None = None

  def run_interpreted(self) -> bool:
    return jax.default_backend() != "gpu" if self.interpret is None else self.interpret


@dataclasses.dataclass(frozen=True)
class Mask:
  """Static mask geometry: kind 'cmp' (block l, stride d, nc compressed tokens) or 'slc' (block l')."""
  kind: str
  block: int
  stride: int = 1
  nc: int = 0


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# Row layout (XLA side).

def to_rows(x_bthd, kv: int, t_pad: int, gp: int):
  """[B, T, H, D] -> [B, K, t_pad * gp, D], rows ordered (token, head in group), zero padding."""
  b, t, h, d = x_bthd.shape
  g = h // kv
  x = x_bthd.reshape(b, t, kv, g, d)
  x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, gp - g), (0, 0)))
  return x.transpose(0, 2, 1, 3, 4).reshape(b, kv, t_pad * gp, d)


def from_rows(x_bkrd, t: int, h: int, gp: int):
  """Inverse of to_rows: [B, K, t_pad * gp, D] -> [B, T, H, D]."""
  b, kv, r, d = x_bkrd.shape
  x = x_bkrd.reshape(b, kv, r // gp, gp, d)[:, :, :t, :h // kv]
  return x.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def rows_to_bkgt(x_bkr, t: int, g: int, gp: int):
  """Per-row scalars [B, K, t_pad * gp] -> [B, K, G, T]."""
  b, kv, r = x_bkr.shape
  return x_bkr.reshape(b, kv, r // gp, gp)[:, :, :t, :g].transpose(0, 1, 3, 2)


def compact(bitmap, length: int):
  """bitmap [..., N] bool -> (ids [..., length] int32 of the True columns in order, padded with 0; count [...])."""
  lead, n = bitmap.shape[:-1], bitmap.shape[-1]
  flat = bitmap.reshape(-1, n)
  pos = jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(flat, pos, length)  # out of range: dropped
  ids = jax.vmap(lambda s: jnp.zeros((length,), jnp.int32).at[s].set(jnp.arange(n, dtype=jnp.int32), mode="drop"))
  return ids(slot).reshape(*lead, length), flat.sum(-1, dtype=jnp.int32).reshape(lead)


def np_compact(bitmap: np.ndarray, length: int):
  ids = np.zeros(bitmap.shape[:-1] + (length,), np.int32)
  for row in np.ndindex(bitmap.shape[:-1]):
    nz = np.flatnonzero(bitmap[row])
    ids[row][:len(nz)] = nz
  return ids, bitmap.sum(-1).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel helpers.

def _iota(n: int, axis: int = 0, shape=None):
  return lax.broadcasted_iota(jnp.int32, shape or (n,), axis)


def _dot(a, b, contract=(1, 1)):
  """fp32-accumulated a @ b with chosen contracting dims ((1, 1) = a @ b.T, (0, 0) = a.T @ b, (1, 0) = a @ b)."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _visible(mask: Mask, tok_m, j, bk: int, sel_mn=None):
  """[M, bk] bool: row token tok_m[r] sees key j*bk + c of key tile j."""
  key = j * bk + _iota(bk, 1, (1, bk))
  t = tok_m[:, None]
  if mask.kind == "cmp":
    return (key * mask.stride + mask.block - 1 <= t) & (key >= 0) & (key < mask.nc)
  member = jnp.max(jnp.where(sel_mn == j, 1, 0), axis=1) > 0  # this row's token picked block j
  return member[:, None] & (key <= t)


def _row_tokens(i, m: int, tq: int, gp: int):
  return i * tq + _iota(m) // gp


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Refs: counts / lists of key (or query) tiles, then data; `sel` (slc only) = per-row block ids.

def _fwd_kernel(*refs, mask: Mask, scale: float, tq: int, gp: int, bk: int):
  if mask.kind == "slc":
    cnt_ref, list_ref, q_ref, k_ref, v_ref, sel_ref, o_ref, lse_ref = refs
    sel = sel_ref[...]
  else:
    cnt_ref, list_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    sel = None
  i = pl.program_id(2)
  q = q_ref[...]
  m_rows, d = q.shape
  tok = _row_tokens(i, m_rows, tq, gp)

  def body(n, carry):
    acc, m, l = carry
    j = list_ref[n]
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = jnp.where(_visible(mask, tok, j, bk, sel), _dot(q, k) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((m_rows, d), jnp.float32), jnp.full((m_rows,), -jnp.inf, jnp.float32),
          jnp.zeros((m_rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt_ref[0], body, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(*refs, mask: Mask, scale: float, tq: int, gp: int, bk: int):
  if mask.kind == "slc":
    cnt_ref, list_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sel_ref, dq_ref = refs
    sel = sel_ref[...]
  else:
    cnt_ref, list_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    sel = None
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  tok = _row_tokens(i, q.shape[0], tq, gp)

  def body(n, dq):
    j = list_ref[n]
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    p = jnp.where(_visible(mask, tok, j, bk, sel), jnp.exp(_dot(q, k) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, mask: Mask, scale: float, tq: int, gp: int, bk: int):
  """One work item (key tile j, entries [lo, hi) of its query-tile list): dk/dv of those query tiles, added into
  the fp32 accumulators with atomics (items of one key tile run in parallel). Idle items (j = -1) do nothing."""
  if mask.kind == "slc":
    item_ref, list_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sel_ref, _, _, dk_ref, dv_ref = refs
  else:
    item_ref, list_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, _, _, dk_ref, dv_ref = refs
    sel_ref = None
  j, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  m_rows = tq * gp

  @pl.when(j >= 0)
  def _():
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]

    def body(n, carry):
      dk, dv = carry
      i = list_ref[j, n]
      rows = pl.ds(i * m_rows, m_rows)
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse, delta = lse_ref[rows], delta_ref[rows]
      sel = None if sel_ref is None else sel_ref[rows, :]
      tok = _row_tokens(i, m_rows, tq, gp)
      p = jnp.where(_visible(mask, tok, j, bk, sel), jnp.exp(_dot(q, k) * scale - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
      ds = p * (_dot(do, v) - delta[:, None])
      return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    plgpu.atomic_add(dk_ref, (keys, slice(None)), dk * scale)
    plgpu.atomic_add(dv_ref, (keys, slice(None)), dv)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers over rows. Lists: q_cnt [b|1, k|1, nQ], q_ids [.., nQ, Lq] (key tiles per query tile);
# k_cnt [.., nK], k_ids [.., nK, Lk] (query tiles per key tile); items [.., nI, 4] (dk/dv work items, work_items).

def item_chunk(pairs: int, chunk: int, items: int) -> int:
  """Query tiles per work item: `chunk`, or fewer when `pairs` (query tile, key tile) pairs of one (batch, kv
  head) would make fewer than `items` items (short sequences would otherwise leave most SMs idle)."""
  return max(1, min(chunk, -(-pairs // items)))


def work_items(k_cnt, chunk: int, n_items: int):
  """Query tiles per key tile [B|1, K|1, nK] -> dk/dv work items [.., n_items, 4] int32 (key tile j, lo, hi, 0):
  tile j's query-tile list is cut into ceil(cnt_j / chunk) items [lo, hi), in tile order, so a key tile that
  every query tile uses (NSA's forced first block, the first compressed tile) spreads over many programs; rows
  past the last item have j = -1. n_items must be >= sum_j ceil(cnt_j / chunk) (static)."""
  n = k_cnt.shape[-1]
  per = (k_cnt + chunk - 1) // chunk
  ends = jnp.cumsum(per, axis=-1)
  x = jnp.arange(n_items, dtype=jnp.int32)
  tile = jax.vmap(lambda e: jnp.searchsorted(e, x, side="right"))(ends.reshape(-1, n)).reshape(
      *k_cnt.shape[:-1], n_items).astype(jnp.int32)
  safe = jnp.minimum(tile, n - 1)
  lo = (x - jnp.take_along_axis(ends - per, safe, axis=-1)) * chunk
  hi = jnp.minimum(jnp.take_along_axis(k_cnt, safe, axis=-1), lo + chunk)
  return jnp.stack([jnp.where(tile < n, tile, -1), lo, hi, jnp.zeros_like(lo)], axis=-1).astype(jnp.int32)


def _lead(lists):
  """(b, k) -> this program's leading block indices into `lists`; lists shared over batch / heads have leading
  dims 1 (index 0)."""
  bb, kb = lists.shape[0] > 1, lists.shape[1] > 1
  return lambda b, k: (b if bb else 0, k if kb else 0)


def _list_specs(cnt, ids):
  """BlockSpecs picking this program's count and id row."""
  lead = _lead(cnt)
  return [pl.BlockSpec((None, None, 1), lambda b, k, x, *_: (*lead(b, k), x)),
          pl.BlockSpec((None, None, None, ids.shape[-1]), lambda b, k, x, *_: (*lead(b, k), x, 0))]


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks: Blocks, name: str, aliases=None):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases or {},
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=blocks.run_interpreted(), name=name)


def _static(mask, scale, tq, gp, bk):
  return dict(mask=mask, scale=scale, tq=tq, gp=gp, bk=bk)


def _fwd(q_rows, k, v, sel_rows, lists, *, mask, scale, tq, gp, bk, blocks):
  b, kv, r, d = q_rows.shape
  m_rows = tq * gp
  q_cnt, q_ids = lists[:2]
  full_k = pl.BlockSpec((None, None, k.shape[2], d), lambda b_, k_, i: (b_, k_, 0, 0))
  row_blk = lambda *tail: pl.BlockSpec((None, None, m_rows, *tail), lambda b_, k_, i: (b_, k_, i) + (0,) * len(tail))
  in_specs = [*_list_specs(q_cnt, q_ids), row_blk(d), full_k, full_k]
  args = [q_cnt, q_ids, q_rows, k, v]
  if mask.kind == "slc":
    in_specs.append(row_blk(sel_rows.shape[-1]))
    args.append(sel_rows)
  return _call(functools.partial(_fwd_kernel, **_static(mask, scale, tq, gp, bk)), (b, kv, r // m_rows), in_specs,
               [row_blk(d), row_blk()],
               [jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype), jax.ShapeDtypeStruct((b, kv, r), jnp.float32)],
               blocks, f"nsa_{mask.kind}_fwd")(*args)


def _bwd(q_rows, k, v, sel_rows, lists, o_rows, lse, do_rows, *, mask, scale, tq, gp, bk, blocks):
  """dq per query tile; dk/dv per work item (a key tile and a chunk of the query tiles that use it), summed in
  fp32 with atomics (bounds the sequential work of key tiles that every query tile uses)."""
  b, kv, r, d = q_rows.shape
  m_rows = tq * gp
  q_cnt, q_ids, _, k_ids, items = lists
  delta = jnp.sum(o_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)  # [B, K, R]
  st = _static(mask, scale, tq, gp, bk)
  slc = mask.kind == "slc"

  # dq: one program per query tile over its key tiles
  full = lambda n, *tail: pl.BlockSpec((None, None, n, *tail), lambda b_, k_, x: (b_, k_, 0) + (0,) * len(tail))
  row_blk = lambda *tail: pl.BlockSpec((None, None, m_rows, *tail), lambda b_, k_, i: (b_, k_, i) + (0,) * len(tail))
  in_specs = [*_list_specs(q_cnt, q_ids), row_blk(d), full(k.shape[2], d), full(k.shape[2], d), row_blk(d),
              row_blk(), row_blk()]
  args = [q_cnt, q_ids, q_rows, k, v, do_rows, lse, delta]
  if slc:
    in_specs.append(row_blk(sel_rows.shape[-1]))
    args.append(sel_rows)
  dq = _call(functools.partial(_dq_kernel, **st), (b, kv, r // m_rows), in_specs, row_blk(d),
             jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype), blocks, f"nsa_{mask.kind}_dq")(*args)

  # dk, dv: one program per work item, fp32 accumulators aliased in and out
  lead = _lead(items)
  in_specs = [pl.BlockSpec((None, None, None, 4), lambda b_, k_, x: (*lead(b_, k_), x, 0)),
              pl.BlockSpec((None, None, *k_ids.shape[2:]), lambda b_, k_, x: (*lead(b_, k_), 0, 0)),
              full(r, d), full(k.shape[2], d), full(k.shape[2], d), full(r, d), full(r), full(r)]
  args = [items, k_ids, q_rows, k, v, do_rows, lse, delta]
  if slc:
    in_specs.append(full(r, sel_rows.shape[-1]))
    args.append(sel_rows)
  acc = jax.ShapeDtypeStruct(k.shape, jnp.float32)
  in_specs += [full(k.shape[2], d)] * 2
  args += [jnp.zeros(acc.shape, acc.dtype)] * 2
  dk, dv = _call(functools.partial(_dkdv_kernel, **st), (b, kv, items.shape[2]), in_specs,
                 [full(k.shape[2], d)] * 2, [acc] * 2, blocks, f"nsa_{mask.kind}_dkdv",
                 aliases={len(args) - 2: 0, len(args) - 1: 1})(*args)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def sparse_attention_rows(q_rows, k, v, sel_rows, lists, static):
  """Block-sparse GQA attention over rows: (o_rows, lse [B, K, R]); lse carries no gradient."""
  return _fwd(q_rows, k, v, sel_rows, lists, **dict(static))


def _sparse_fwd(q_rows, k, v, sel_rows, lists, static):
  o, lse = _fwd(q_rows, k, v, sel_rows, lists, **dict(static))
  return (o, lse), (q_rows, k, v, sel_rows, lists, o, lse)


def _sparse_bwd(static, res, cot):
  q_rows, k, v, sel_rows, lists, o, lse = res
  do, _ = cot  # lse is used only for the (non-differentiable) selection scores
  dq, dk, dv = _bwd(q_rows, k, v, sel_rows, lists, o, lse, do.astype(q_rows.dtype), **dict(static))
  zero_int = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)
  return dq, dk, dv, zero_int(sel_rows), jax.tree.map(zero_int, lists)


sparse_attention_rows.defvjp(_sparse_fwd, _sparse_bwd)


def _freeze(**kw):
  return tuple(sorted(kw.items()))


# ---------------------------------------------------------------------------------------------------------------
# Public: the compressed branch, its selection scores, and the selected branch.

def _geometry_rows(t: int, h: int, kv: int, tq: int):
  """(G, Gp, tile tokens raised so a tile holds >= 16 rows (the tensor cores' smallest M), padded T)."""
  g = h // kv
  gp = next_pow2(g)
  tq = max(tq, -(-16 // gp))
  return g, gp, tq, -(-t // tq) * tq


def cmp_lists(t_pad: int, nc: int, *, block: int, stride: int, tq: int, bk: int, chunk: int, items: int):
  """Static lists for the compressed branch: query tile i visits key tiles whose first token has ended by the
  tile's last token (a prefix); key tile j is visited by the query tiles after that (a suffix)."""
  n_q, n_k = t_pad // tq, -(-nc // bk)
  last_tok = np.arange(n_q)[:, None] * tq + tq - 1
  first_end = np.arange(n_k)[None, :] * bk * stride + block - 1
  bitmap = last_tok >= first_end  # [nQ, nK]
  q_ids, q_cnt = np_compact(bitmap, next_pow2(max(n_k, 1)))
  k_ids, k_cnt = np_compact(bitmap.T, next_pow2(max(n_q, 1)))
  lists = tuple(jnp.asarray(x)[None, None] for x in (q_cnt, q_ids, k_cnt, k_ids))
  chunk = item_chunk(int(k_cnt.sum()), chunk, items)
  n_items = max(1, int((-(-k_cnt // chunk)).sum()))
  return (*lists, work_items(lists[2], chunk, n_items))


def compressed_attention(q_bthd, kc_bnkd, vc_bnkd, *, compress_block: int, compress_stride: int,
                         scale: float | None = None, blocks: Blocks = Blocks()):
  """Queries [B, T, H, D] over compressed tokens [B, Nc, K, D] (token c ends at c*d + l - 1) ->
  (o [B, T, H, D] in q's dtype, lse [B, K, G, T] fp32, +inf where nothing is visible; lse has no gradient)."""
  b, t, h, d = q_bthd.shape
  nc, kv = kc_bnkd.shape[1], kc_bnkd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  g, gp, tq, t_pad = _geometry_rows(t, h, kv, blocks.cmp_q)
  bk = blocks.cmp_k
  n_k = max(1, -(-nc // bk))
  kv_pad = lambda x: jnp.pad(x, ((0, 0), (0, n_k * bk - nc), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  mask = Mask("cmp", compress_block, compress_stride, nc)
  lists = cmp_lists(t_pad, max(nc, 1), block=compress_block, stride=compress_stride, tq=tq, bk=bk,
                    chunk=blocks.cmp_chunk, items=blocks.dkdv_items)
  static = _freeze(mask=mask, scale=float(scale), tq=tq, gp=gp, bk=bk, blocks=blocks)
  o_rows, lse = sparse_attention_rows(to_rows(q_bthd, kv, t_pad, gp), kv_pad(kc_bnkd), kv_pad(vc_bnkd), None,
                                      lists, static)
  return from_rows(o_rows, t, h, gp), jax.lax.stop_gradient(rows_to_bkgt(lse, t, g, gp))


def remap_matrices(*, compress_block: int, compress_stride: int, select_block: int, bk: int):
  """wa, wb [bk, bs] fp32: overlap, in strides, of compressed token a of tile jt (wa) or jt - 1 (wb) with
  selection block s of selection tile jt (bs = bk * d / l' blocks per tile; the paper's Eq. 9)."""
  c, r = compress_block // compress_stride, select_block // compress_stride
  bs = bk // r
  a = np.arange(bk)[:, None]
  s0 = np.arange(bs)[None, :] * r
  overlap = lambda start: np.maximum(0, np.minimum(start + c, s0 + r) - np.maximum(start, s0))
  return overlap(a).astype(np.float32), overlap(a - bk).astype(np.float32)


_BIG_ID = 2 ** 30  # id of an empty or already taken slot in the running top-n


def _merge_top(run_v, run_i, cand_v, cand_i, n: int):
  """Top n by (value desc, id asc) of a running list (run_v, run_i [M, n']) and candidates (cand_v, cand_i [M, c]),
  in that order (lax.top_k's tie rule); empty slots hold -inf / _BIG_ID. Returns the new running list."""
  col = _iota(run_v.shape[1], 1, run_v.shape)
  new_v, new_i = jnp.full(run_v.shape, -jnp.inf, jnp.float32), jnp.full(run_i.shape, _BIG_ID, jnp.int32)
  for r in range(n):
    best = jnp.maximum(jnp.max(run_v, axis=1), jnp.max(cand_v, axis=1))[:, None]
    pick = jnp.minimum(jnp.min(jnp.where(run_v == best, run_i, _BIG_ID), axis=1),
                       jnp.min(jnp.where(cand_v == best, cand_i, _BIG_ID), axis=1))[:, None]
    new_v, new_i = jnp.where(col == r, best, new_v), jnp.where(col == r, pick, new_i)
    run_v, run_i = jnp.where(run_i == pick, -jnp.inf, run_v), jnp.where(run_i == pick, _BIG_ID, run_i)
    cand_v, cand_i = jnp.where(cand_i == pick, -jnp.inf, cand_v), jnp.where(cand_i == pick, _BIG_ID, cand_i)
  return new_v, new_i


def _select_kernel(q_ref, lse_ref, kc_ref, wa_ref, wb_ref, out_ref, *, mask: Mask, scale: float, tq: int, gp: int,
                   g: int, bk: int, select_block: int, ns: int, top: int, local_blocks: int):
  """One query tile's selection: loop over selection tiles jt (bs blocks each) up to the tile holding the last
  token's own block. Tile jt's scores are P(jt) @ wa + P(jt - 1) @ wb with P(j) the group-summed compressed
  probabilities of compressed tile j (each computed once, carried to the next tile). top == 0: write the
  [tq, S'] scores (zeros past the loop). top > 0: mask (first / local blocks +inf, future blocks -inf) and merge
  into a running top-n; write the [tq, n'] block ids, -1 where the value is -inf (fewer visible blocks than n)."""
  i = pl.program_id(2)
  q, lse = q_ref[...], lse_ref[...]
  wa, wb = wa_ref[...], wb_ref[...]
  m_rows = q.shape[0]
  bs = wa.shape[1]
  n_k = kc_ref.shape[0] // bk
  n_st = -(-ns // bs)
  tok = _row_tokens(i, m_rows, tq, gp)
  real_head = (_iota(m_rows) % gp < g)[:, None]
  cur = (i * tq + _iota(tq)) // select_block  # [tq] each token's own block
  n_loop = jnp.minimum((i * tq + tq - 1) // select_block // bs + 1, n_st)

  def probs(j):  # [tq, bk]; a tile past the last compressed one loads the last and is masked (key >= nc)
    k = kc_ref[pl.ds(jnp.minimum(j, n_k - 1) * bk, bk), :]
    p = jnp.where(_visible(mask, tok, j, bk) & real_head, jnp.exp(_dot(q, k) * scale - lse[:, None]), 0.0)
    return jnp.sum(p.reshape(tq, gp, bk), axis=1)

  def scores(jt, carry):
    p = probs(jt)
    return _dot(p, wa, (1, 0)) + carry, _dot(p, wb, (1, 0))

  zeros = jnp.zeros((tq, bs), jnp.float32)
  if not top:
    def body(jt, carry):
      score, carry = scores(jt, carry)
      out_ref[:, pl.ds(jt * bs, bs)] = score
      return carry

    lax.fori_loop(0, n_loop, body, zeros)

    def clear(jt, c):
      out_ref[:, pl.ds(jt * bs, bs)] = zeros
      return c

    lax.fori_loop(n_loop, n_st, clear, 0)
    return

  width = out_ref.shape[1]
  last_col = _iota(width, 1, (tq, width)) == top - 1

  def body(jt, carry):
    run_v, run_i, carry = carry
    score, carry = scores(jt, carry)
    blk = jt * bs + _iota(bs, 1, (tq, bs))
    c = cur[:, None]
    forced = (blk == 0) | ((blk <= c) & (blk > c - local_blocks))
    future = (blk > c) | (blk >= ns)
    score = jnp.where(future, -jnp.inf, jnp.where(forced, jnp.inf, score))
    # merge only when some row's best candidate beats its n-th value (a tie goes to the older, lower id)
    nth = jnp.min(jnp.where(last_col, run_v, jnp.inf), axis=1)
    beats = jnp.max(jnp.where(jnp.max(score, axis=1) > nth, 1, 0)) > 0
    run_v, run_i = lax.cond(beats, lambda: _merge_top(run_v, run_i, score, blk, top), lambda: (run_v, run_i))
    return run_v, run_i, carry

  init = (jnp.full((tq, width), -jnp.inf, jnp.float32), jnp.full((tq, width), _BIG_ID, jnp.int32), zeros)
  run_v, run_i, _ = lax.fori_loop(0, n_loop, body, init)
  out_ref[...] = jnp.where(run_v > -jnp.inf, run_i, -1)


def _selection(q_bthd, kc_bnkd, lse_bkgt, *, compress_block: int, compress_stride: int, select_block: int,
               scale: float | None, blocks: Blocks, top: int, local_blocks: int):
  q_bthd, kc_bnkd, lse_bkgt = map(jax.lax.stop_gradient, (q_bthd, kc_bnkd, lse_bkgt))
  b, t, h, d = q_bthd.shape
  nc, kv = kc_bnkd.shape[1], kc_bnkd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  g, gp, tq, t_pad = _geometry_rows(t, h, kv, blocks.cmp_q)
  bk = blocks.cmp_k
  if (bk * compress_stride) % select_block or compress_block // compress_stride > bk + 1:
    raise ValueError(f"cmp_k={bk} times stride {compress_stride} must be a multiple of select_block {select_block}")
  wa, wb = (jnp.asarray(w) for w in remap_matrices(compress_block=compress_block, compress_stride=compress_stride,
                                                   select_block=select_block, bk=bk))
  bs = wa.shape[1]
  ns = -(-t // select_block)
  n_k = max(1, -(-nc // bk))
  width = next_pow2(top) if top else -(-ns // bs) * bs
  kc = jnp.pad(kc_bnkd, ((0, 0), (0, n_k * bk - nc), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  lse = jnp.pad(lse_bkgt.transpose(0, 1, 3, 2), ((0, 0), (0, 0), (0, t_pad - t), (0, gp - g)),
                constant_values=jnp.inf).reshape(b, kv, t_pad * gp)
  m_rows = tq * gp
  kernel = functools.partial(_select_kernel, mask=Mask("cmp", compress_block, compress_stride, nc),
                             scale=float(scale), tq=tq, gp=gp, g=g, bk=bk, select_block=select_block, ns=ns,
                             top=top, local_blocks=local_blocks)
  const = pl.BlockSpec((bk, bs), lambda b_, k_, i: (0, 0))
  out = pl.pallas_call(
      kernel, grid=(b, kv, t_pad // tq),
      in_specs=[pl.BlockSpec((None, None, m_rows, d), lambda b_, k_, i: (b_, k_, i, 0)),
                pl.BlockSpec((None, None, m_rows), lambda b_, k_, i: (b_, k_, i)),
                pl.BlockSpec((None, None, n_k * bk, d), lambda b_, k_, i: (b_, k_, 0, 0)), const, const],
      out_specs=pl.BlockSpec((None, None, tq, width), lambda b_, k_, i: (b_, k_, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, kv, t_pad, width), jnp.int32 if top else jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=blocks.run_interpreted(), name="nsa_select_top" if top else "nsa_selection_scores",
  )(to_rows(q_bthd, kv, t_pad, gp), lse, kc, wa, wb)
  return out[:, :, :t, :min(top, ns) if top else ns]


def selection_scores(q_bthd, kc_bnkd, lse_bkgt, *, compress_block: int, compress_stride: int, select_block: int,
                     scale: float | None = None, blocks: Blocks = Blocks()):
  """[B, K, T, S] fp32 (S = ceil(T / l')): compressed probabilities exp(q.kc * scale - lse), summed over each
  GQA group's heads and remapped to selection blocks. Not differentiable (inputs pass stop_gradient)."""
  return _selection(q_bthd, kc_bnkd, lse_bkgt, compress_block=compress_block, compress_stride=compress_stride,
                    select_block=select_block, scale=scale, blocks=blocks, top=0, local_blocks=0)


def select_top(q_bthd, kc_bnkd, lse_bkgt, *, compress_block: int, compress_stride: int, select_block: int,
               num_selected: int, local_blocks: int, scale: float | None = None, blocks: Blocks = Blocks()):
  """Selected block ids [B, K, T, n'] (n' = min(n, S)) straight from the scores, which never reach HBM: the same
  ids as nsa.select_blocks(selection_scores(...)) (first block and `local_blocks` blocks ending at the token's
  own block forced, future blocks excluded, ties to the lower id, -1 where fewer than n' blocks are visible)."""
  return _selection(q_bthd, kc_bnkd, lse_bkgt, compress_block=compress_block, compress_stride=compress_stride,
                    select_block=select_block, scale=scale, blocks=blocks, top=int(num_selected),
                    local_blocks=int(local_blocks))


def slc_lists(idx_bktn, t_pad: int, ns: int, tq: int, chunk: int, items: int):
  """Lists from selected block ids [B, K, T, n] (-1 = unused): per query tile the union of its tokens' blocks,
  per selection block the query tiles that picked it."""
  b, kv, t, n = idx_bktn.shape
  n_q = t_pad // tq
  tile = (jnp.arange(t) // tq)[None, None, :, None]
  bitmap = jnp.zeros((b, kv, n_q, ns), bool).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(kv)[None, :, None, None], tile,
      jnp.where(idx_bktn >= 0, idx_bktn, ns)].set(True, mode="drop")
  q_ids, q_cnt = compact(bitmap, next_pow2(min(ns, tq * n)))
  k_ids, k_cnt = compact(bitmap.transpose(0, 1, 3, 2), next_pow2(n_q))
  pairs = n_q * min(ns, tq * n)  # bound on sum_j cnt_j (each query tile uses <= min(ns, tq * n) blocks)
  chunk = item_chunk(pairs, chunk, items)
  return q_cnt, q_ids, k_cnt, k_ids, work_items(k_cnt, chunk, -(-pairs // chunk) + ns)


def selected_attention(q_bthd, ks_bskd, vs_bskd, idx_bktn, *, select_block: int, scale: float | None = None,
                       blocks: Blocks = Blocks()):
  """Queries [B, T, H, D] over the raw keys/values [B, T, K, D] of their group's selected blocks idx [B, K, T, n]
  (-1 = unused slot), causal inside the current block. Returns [B, T, H, D] in q's dtype."""
  b, t, h, d = q_bthd.shape
  kv = ks_bskd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  g, gp, tq, t_pad = _geometry_rows(t, h, kv, blocks.slc_q)
  ns = -(-t // select_block)
  n = idx_bktn.shape[-1]
  kv_pad = lambda x: jnp.pad(x, ((0, 0), (0, ns * select_block - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  idx = jax.lax.stop_gradient(idx_bktn).astype(jnp.int32)
  sel = jnp.pad(idx, ((0, 0), (0, 0), (0, t_pad - t), (0, next_pow2(n) - n)), constant_values=-1)
  sel_rows = jnp.repeat(sel, gp, axis=2)  # [B, K, t_pad * gp, n'] row (token, head) -> its token's ids
  lists = slc_lists(idx, t_pad, ns, tq, blocks.slc_chunk, blocks.dkdv_items)
  static = _freeze(mask=Mask("slc", select_block), scale=float(scale), tq=tq, gp=gp, bk=select_block,
                   blocks=blocks)
  o_rows, _ = sparse_attention_rows(to_rows(q_bthd, kv, t_pad, gp), kv_pad(ks_bskd), kv_pad(vs_bskd), sel_rows,
                                    lists, static)
  return from_rows(o_rows, t, h, gp)
