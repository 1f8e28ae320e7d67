"""Grouped matmul for dropless MoE in Pallas (Triton lowering on GPU, interpret mode elsewhere).

Rows of x are sorted by group (expert): group e owns rows [start_e, end_e), end_e = start_e + group_sizes[e].
Two kernels, each bf16 (or fp32) in, fp32 accumulate:

  gmm   y[m] = x[m] @ w[g(m)]          (transpose_rhs: x[m] @ w[g(m)].T, the input gradient dx = dy @ w^T)
  tgmm  out[e] = x_e^T @ dy_e          (the weight gradient dw[e], a "transposed grouped matmul")

gmm tiles the rows into blocks of block_m. A row tile that straddles a group boundary is visited once per group
it intersects (megablox-style), so the grid's second axis runs over "visits" (tile, group), a schedule computed
on device from group_sizes with plain jnp: at most num_tiles + E visits (each of the E group boundaries splits at
most one tile); the unused tail of the schedule is skipped. Each visit multiplies the whole tile by its group's
weight block and stores only that group's rows (masked store), so two visits of one tile write disjoint rows.
Rows past sum(group_sizes) form a pseudo-group whose visits store zeros (jax.lax.ragged_dot's semantics).
The extra work is at most E partial tiles per column block: ~E * block_m rows over M (1.6% at 65536 rows).

tgmm gives each program one (group, K block, N block) of the output and loops over the group's rows in steps of
block_m with masked loads at the two ends, accumulating x_blk^T @ dy_blk in fp32.

Grids are ordered so programs that run together share data in L2: gmm walks the output column blocks fastest
(one row tile is reused across all column blocks), tgmm walks N then K blocks fastest within a group (every
concurrent program streams the same rows).

Arrays are zero-padded to multiples of the block sizes (a no-op at the MoE shapes, where every dimension is a
multiple of 128) so that no load or store leaves the arrays: only group boundaries need masks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes (powers of two, >= 16 for the tensor cores) and Triton launch parameters of one kernel.

  gmm: block_m rows x block_n output columns per program, block_k contraction step.
  tgmm: block_k x block_n output tile per program, block_m rows per contraction step.
  """
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3

  @classmethod
  def parse(cls, text: str) -> "Tiling":
    """'bm,bn,bk,warps,stages' (e.g. '128,128,64,8,3')."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 5:
      raise ValueError(f"tiling {text!r} must be 5 integers: block_m,block_n,block_k,num_warps,num_stages")
    return cls(*parts)

  def __str__(self):
    return f"{self.block_m},{self.block_n},{self.block_k},{self.num_warps},{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class GmmConfig:
  """Tilings of the three kernels of a forward + backward: y = x @ w, dx = dy @ w^T, dw = x^T @ dy."""
  fwd: Tiling = Tiling()
  dlhs: Tiling = Tiling()
  drhs: Tiling = Tiling(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad(a, axis: int, multiple: int):
  extra = _round_up(a.shape[axis], multiple) - a.shape[axis]
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def group_bounds(group_sizes_e, num_rows: int):
  """int32 [E] start and end rows of each group, clipped to num_rows (sizes summing past it are cut)."""
  ends_e = jnp.minimum(jnp.cumsum(group_sizes_e.astype(jnp.int32)), num_rows)
  starts_e = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_e[:-1]])
  return starts_e, ends_e


def visit_schedule(group_sizes_e, num_rows: int, padded_rows: int, block_m: int):
  """(group_v, tile_v, starts_g, ends_g) for gmm's grid of num_tiles + E visits.

  Groups 0..E-1 are the real ones, group E holds rows [sum(sizes), padded_rows) (zero outputs), and visits past
  the last needed one get group E + 1 (skipped). starts_g / ends_g have E + 2 entries so that any visit's group
  indexes them.
  """
  e = group_sizes_e.shape[0]
  starts_e, ends_e = group_bounds(group_sizes_e, num_rows)
  starts_g = jnp.concatenate([starts_e, ends_e[-1:], jnp.zeros((1,), jnp.int32)])
  ends_g = jnp.concatenate([ends_e, jnp.full((2,), padded_rows, jnp.int32)]).at[-1].set(0)
  sizes_g = (ends_g - starts_g)[:-1]  # [E + 1]
  first_g = starts_g[:-1] // block_m
  last_g = (ends_g[:-1] - 1) // block_m
  count_g = jnp.where(sizes_g > 0, last_g - first_g + 1, 0)
  visit_end_g = jnp.cumsum(count_g)
  v = jnp.arange(padded_rows // block_m + e, dtype=jnp.int32)
  group_v = jnp.searchsorted(visit_end_g, v, side="right").astype(jnp.int32)  # E + 1 past the end
  gc = jnp.minimum(group_v, e)
  tile_v = first_g[gc] + v - (visit_end_g[gc] - count_g[gc])
  tile_v = jnp.where(group_v <= e, tile_v, 0).astype(jnp.int32)
  return group_v, tile_v, starts_g, ends_g


def _dot(a, b, trans_b: bool = False):
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # fp32 stays fp32 (no tf32) on GPU
  return plgpu.dot(a, b.T if trans_b else b, precision=prec)


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, x_ref, w_ref, o_ref, *, num_groups: int,
                transpose_rhs: bool, bm: int, bn: int, bk: int):
  """One visit (row tile, group) x one block of bn output columns."""
  n0 = pl.program_id(0) * bn
  v = pl.program_id(1)
  g = group_ref[v]
  row0 = tile_ref[v] * bm
  contraction = x_ref.shape[1]

  def rows_mask():
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    in_group = (rows >= start_ref[g]) & (rows < end_ref[g])
    return jnp.broadcast_to(in_group[:, None], (bm, bn))

  out = o_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)]

  @pl.when(g < num_groups)
  def _compute():
    def body(i, acc):
      k0 = pl.multiple_of(i * bk, bk)
      x = x_ref[pl.ds(row0, bm), pl.ds(k0, bk)]
      if transpose_rhs:  # w[g] is [N, K] here: y = x @ w[g].T
        return acc + _dot(x, w_ref[g, pl.ds(n0, bn), pl.ds(k0, bk)], trans_b=True)
      return acc + _dot(x, w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)])

    acc = lax.fori_loop(0, contraction // bk, body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out, acc.astype(o_ref.dtype), mask=rows_mask())

  @pl.when(g == num_groups)
  def _zeros():  # rows past the last group
    plgpu.store(out, jnp.zeros((bm, bn), o_ref.dtype), mask=rows_mask())


def grouped_matmul(x_mk, w_ekn, group_sizes_e, *, transpose_rhs: bool = False, tiling: Tiling = Tiling(),
                   interpret: bool | None = None):
  """y[m] = x[m] @ w[g(m)] ([M, N]; with transpose_rhs w is [E, N, K] and y[m] = x[m] @ w[g(m)].T)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  m, k = x_mk.shape
  e = w_ekn.shape[0]
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  if (w_ekn.shape[2] if transpose_rhs else w_ekn.shape[1]) != k:
    raise ValueError(f"contraction mismatch: x {x_mk.shape} vs w {w_ekn.shape} (transpose_rhs={transpose_rhs})")
  bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
  x = _pad(_pad(x_mk, 0, bm), 1, bk)
  w = _pad(_pad(w_ekn, 1, bn if transpose_rhs else bk), 2, bk if transpose_rhs else bn)
  mp, np_ = x.shape[0], _round_up(n, bn)
  group_v, tile_v, starts_g, ends_g = visit_schedule(group_sizes_e, m, mp, bm)
  kernel = functools.partial(_gmm_kernel, num_groups=e, transpose_rhs=transpose_rhs, bm=bm, bn=bn, bk=bk)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), x_mk.dtype, manual_axis_type=_mat(x_mk)),
      grid=(np_ // bn, group_v.shape[0]),
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
      name="gmm_t" if transpose_rhs else "gmm",
  )(group_v, tile_v, starts_g, ends_g, x, w)
  return y[:m, :n]


def _tgmm_kernel(start_ref, end_ref, x_ref, dy_ref, o_ref, *, bm: int, bn: int, bk: int):
  """out[e, k block, n block] = sum over group e's rows of x^T dy, bm rows per step."""
  n0 = pl.program_id(0) * bn
  k0 = pl.program_id(1) * bk
  e = pl.program_id(2)
  start, end = start_ref[e], end_ref[e]

  def body(i, acc):
    r0 = pl.multiple_of(i * bm, bm)
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)
    in_group = ((rows >= start) & (rows < end))[:, None]
    x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], mask=jnp.broadcast_to(in_group, (bm, bk)), other=0.0)
    dy = plgpu.load(dy_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], mask=jnp.broadcast_to(in_group, (bm, bn)), other=0.0)
    prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return acc + plgpu.dot(x.T, dy, precision=prec)

  # Row steps that touch [start, end); an empty group runs none (or one fully masked step).
  acc = lax.fori_loop(lax.div(start, bm), lax.div(end + bm - 1, bm), body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(o_ref.dtype)


def transposed_grouped_matmul(x_mk, dy_mn, group_sizes_e, num_groups: int, *, tiling: Tiling = Tiling(),
                              out_dtype=None, interpret: bool | None = None):
  """out[e] = x_e^T @ dy_e over group e's rows -> [E, K, N] (zeros for empty groups)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  if dy_mn.shape[0] != m:
    raise ValueError(f"row mismatch: x {x_mk.shape} vs dy {dy_mn.shape}")
  bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
  x = _pad(_pad(x_mk, 0, bm), 1, bk)
  dy = _pad(_pad(dy_mn, 0, bm), 1, bn)
  starts_e, ends_e = group_bounds(group_sizes_e, m)
  kp, np_ = x.shape[1], dy.shape[1]
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, bn=bn, bk=bk),
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype or x_mk.dtype, manual_axis_type=_mat(x_mk)),
      grid=(np_ // bn, kp // bk, num_groups),
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
      name="tgmm",
  )(starts_e, ends_e, x, dy)
  return out[:, :k, :n]


def _mat(x):
  """The manual-axis type of x (which mesh axes it varies over inside a shard_map; empty outside one)."""
  return jax.typeof(x).manual_axis_type


def _varying_alike(*arrays):
  """Inside a shard_map (check_vma), every operand cast to vary over the union of their varying axes: the kernels
  declare their outputs with that type, so the custom VJP's cotangents match their primals, and the casts'
  transposes (psums) reduce e.g. the weight gradient over the token axes outside the kernel. No-op elsewhere."""
  union = frozenset().union(*(_mat(a).varying for a in arrays))
  out = []
  for a in arrays:
    missing = tuple(sorted(union - _mat(a).varying))
    out.append(lax.pcast(a, missing, to="varying") if missing else a)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_mk, w_ekn, group_sizes_e, config: GmmConfig, interpret: bool):
  return grouped_matmul(x_mk, w_ekn, group_sizes_e, tiling=config.fwd, interpret=interpret)


def _gmm_fwd(x_mk, w_ekn, group_sizes_e, config, interpret):
  return _gmm(x_mk, w_ekn, group_sizes_e, config, interpret), (x_mk, w_ekn, group_sizes_e)


def _gmm_bwd(config, interpret, res, dy_mn):
  x_mk, w_ekn, group_sizes_e = res
  dy_mn = dy_mn.astype(x_mk.dtype)
  dx = grouped_matmul(dy_mn, w_ekn, group_sizes_e, transpose_rhs=True, tiling=config.dlhs, interpret=interpret)
  dw = transposed_grouped_matmul(x_mk, dy_mn, group_sizes_e, w_ekn.shape[0], tiling=config.drhs,
                                 out_dtype=w_ekn.dtype, interpret=interpret)
  return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x_mk, w_ekn, group_sizes_e, *, config: GmmConfig | None = None, interpret: bool | None = None):
  """Differentiable y[m] = x[m] @ w[g(m)] for rows sorted by group; drop-in for jax.lax.ragged_dot(x, w, sizes).

  x [M, K] and w [E, K, N] of one dtype (bf16 or fp32; fp32 accumulation); group_sizes int32 [E] with
  sum <= M (rows past the sum get zeros). interpret=None: compiled (Triton) on GPU, interpreted elsewhere.
  """
  if x_mk.dtype != w_ekn.dtype:
    raise ValueError(f"gmm needs one dtype: x is {x_mk.dtype}, w is {w_ekn.dtype} (cast one of them)")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  x_mk, w_ekn, group_sizes_e = _varying_alike(x_mk, w_ekn, group_sizes_e.astype(jnp.int32))
  return _gmm(x_mk, w_ekn, group_sizes_e, config or GmmConfig(), bool(interpret))
