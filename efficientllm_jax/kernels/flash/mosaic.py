"""Flash attention for Hopper in Mosaic GPU (Pallas `plgpu`): forward and backward, causal or not, GQA.

Layout as kernels/flash/kernel.py: q [B, T, H, D], k / v [B, S, K, D], H = K * G; query i sees key j iff j <= i
(causal) and T == S. bf16 / fp16 inputs, fp32 accumulation, softmax in base 2 with log2(e) folded into the scale.

Every kernel is one CTA of three warpgroups: two compute warpgroups of 64 rows each (wgmma's M) and a producer
warpgroup that streams the other operand through a ring of `stages` shared-memory slots with TMA copies. A slot
has a "full" barrier per buffer (the TMA's transaction count) and one "free" barrier that both compute
warpgroups arrive on when they are done with it; the producer waits on "free" before refilling.

  forward  CTA = (b, h, 128 query rows)  streams K, V blocks of `fwd_k` keys   -> o, lse (base 2)
           (in `fwd_stages` slots; 256-key blocks in 3 slots at d 64: ops.mosaic_blocks)
  dq       CTA = (b, h, 128 query rows)  streams K, V blocks of `dq_k` keys    -> dq (recomputes P and dP)
  dk / dv  CTA = (b, kv head, 128 keys)  streams Q, dO, lse, delta blocks of `dkv_q` rows for every query head of
           the group in turn, so dk and dv sum the G heads in registers (GQA-native, no reduction afterwards)

Causal loops stop at the diagonal (forward, dq) or start there (dk / dv). Each loop runs in two parts: blocks
wholly on the visible side first, unmasked, then the blocks that straddle the diagonal, masked with a finite large
negative logit, so a fully masked row of a block contributes exp2(...) = 0 once a real key has been seen (each row
sees key 0 first). Both compute warpgroups run the same number of steps: one of them may run a block that is
masked for all its rows, which costs a step but keeps the barrier phases of the two in lock step.

Scheduling and register use (each choice measured on an H200, benchmarks/RESULTS.md, sessions 7 and 8):
  - forward: FlashAttention-3's ping-pong. The two compute warpgroups take turns over a barrier of two arrivals,
    so one warpgroup's softmax runs while the other's q k^T and p v run. With the unmasked fast path it made the
    forward 1.05-1.13x cuDNN (session 6: 0.83-0.99x). The same ping-pong in the dq and dk / dv kernels made the
    backward slower (0.88x -> 0.75x at d 128) and is not used there.
  - independent products are issued together and waited for once (`_mma_group`): q k^T with dO v^T in dq,
    k q^T with v dO^T and then dv with dk in dk / dv.
  - `overlap`: dS^T is formed while dv's product runs (d 128: 0.94x against 0.92x; d 64 fused: 0.87x against
    0.91x without it).
  - the scale is applied inside the exponent (exp2(s * c - m * c), one FMA an element) and the causal mask is
    built from two 1-D iotas broadcast in registers. Full-tile iotas, hoisted out of the loops, held registers
    for the whole kernel: the dk / dv kernel spilled 72 bytes at d 128 with them and 16 without, the fused d 64
    kernel over 128-row query blocks 424 and 148.
  - `heavy_first` (session 9): causal CTAs launch longest first instead of as a row-major sawtooth per (batch,
    head); see `_grid`. fwd+bwd 0.90x -> 1.10x cuDNN at d 128, 1.00x -> 1.15x at d 64 (the figures below predate it).
  - not used, slower: P^T and dS^T passed to dv's and dk's products through shared memory (more spills, 0.75x
    against 0.86x at d 128); v dO^T issued after P^T is formed, to shorten the live ranges (no spills, 0.78x
    against 0.97x at d 64).

The default backward takes seven matmuls: dq and dk / dv recompute the logits separately, as JAX's stock Mosaic
GPU attention does for its non-causal backward. `MosaicBlocks(fused_dq=True)` takes FlashAttention-3's five: the
dk / dv kernel also writes each warpgroup's dS^T block into shared memory, and the [bq, 128 keys] dS is multiplied
by the CTA's keys (`_dq_split`): with 128-row query blocks (`dkv_q=128`) each warpgroup forms the dq of its own 64
rows; with 64-row blocks at d 128 each takes half of D (FlashAttention-3's split); at d 64 one warpgroup per step
takes all of it, in turn. The product is added into an fp32 dq buffer (a `jax.new_ref`) by a TMA reduce-add.
Measured at 8K: the fused backward over 128-row query blocks is the fastest at d 64 (0.96-0.97x cuDNN at B 4,
against 0.90-0.93x for 64-row blocks and 0.81x unfused); at d 128 the fused dk / dv kernel spills registers (256
bytes, `MOSAIC_GPU_DUMP_PTXAS=1`: dk, dv accumulators of 64 x 128 fp32 each plus P^T, dP^T and the dq block) and
is the slower (0.79-0.81x against 0.84-0.89x). models/attention/ops.py `mosaic_blocks` picks per head dim.

CPU: `interpret=True` runs the same kernels in Pallas' GPU interpret mode (threads, barriers and TMA simulated).
Its wgmma reads both operands from shared memory and it cannot run `pl.run_state` over a wgmma accumulator, so
there `_mma` forms a fresh product plus an add, and a product whose left operand sits in registers is a jnp.dot.
It has no TMA reduction either, so the fused dq is read, added and written back (the interpreter runs the grid
sequentially). Everything else is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2((MASKED - m) * scale) == 0 and never NaN
ROWS = 64  # rows per compute warpgroup (wgmma M); a CTA holds two


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  fwd_k: int = 128  # keys per forward step
  dq_k: int = 64  # keys per dq step
  dkv_q: int = 64  # query rows per dk / dv step
  stages: int = 2  # ring slots per streamed operand
  fwd_stages: int = 0  # the forward's ring slots (0: `stages`)
  fused_dq: bool = False  # backward: dq inside the dk / dv kernel (TMA reduce-add) instead of its own kernel
  overlap: bool = True  # dk / dv: form dS^T while dv's product runs (measured: faster at d 128, slower at d 64)
  heavy_first: bool = True  # causal: CTAs start longest first (see `_grid`); off: row-major sawtooth (slower)


@dataclasses.dataclass(frozen=True)
class MosaicParams:
  scale: float
  causal: bool
  blocks: MosaicBlocks = MosaicBlocks()
  interpret: bool = False


def unsupported(q, k, v, *, window: int = 0, q_offset: int = 0, bias=None) -> str | None:
  """Why the Mosaic kernels cannot take this call (None: they can)."""
  _, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if bias is not None or window or q_offset:
    return "the Mosaic GPU kernels take no bias, window or query offset"
  if v.shape[-1] != d or d not in (64, 128):
    return f"the Mosaic GPU kernels need equal q/k/v head dims of 64 or 128 (got {d} / {v.shape[-1]})"
  if t != s or t % (2 * ROWS):
    return f"the Mosaic GPU kernels need T == S, a multiple of {2 * ROWS} (got T={t}, S={s})"
  if h % kh:
    return f"{h} query heads are not a multiple of {kh} kv heads"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"the Mosaic GPU kernels take bf16 / fp16 q, k, v (got {q.dtype}, {k.dtype}, {v.dtype})"
  return None


def _tiles():
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _mma(acc, a, b, shape, interpret: bool):
  """acc + a @ b (fp32 wgmma); acc None: the product alone. a: registers or shared memory, b: shared memory."""
  if interpret and isinstance(a, jax.Array):  # the interpreter's wgmma reads both operands from shared memory
    out = jnp.dot(a, b[...], preferred_element_type=jnp.float32)
    return out if acc is None else acc + out
  if acc is None or interpret:
    def fresh(ref):
      plgpu.wgmma(ref, a, b)
      return ref[...]
    out = pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))
    return out if acc is None else acc + out

  def into(ref):
    plgpu.wgmma(ref, a, b)
  return pl.run_state(into)(plgpu.ACC.init(acc))


def _mma_group(products, interpret: bool):
  """Several products `(acc, a, b, shape)` (as `_mma`) issued back to back and waited for once, so the tensor
  cores run them without a wait in between. An `a` that is a callable is called just before its product is
  issued, so its work (and any wait in it) overlaps the products issued before. Returns the results in order."""
  if interpret:
    return tuple(_mma(acc, a() if callable(a) else a, b, shape, interpret) for acc, a, b, shape in products)

  def issue(refs):
    for ref, (_, a, b, _) in zip(refs, products):
      plgpu.wgmma(ref, a() if callable(a) else a, b)
  inits = tuple(plgpu.ACC.init(acc if acc is not None else _zeros(shape)) for acc, _, _, shape in products)
  return tuple(pl.run_state(issue)(inits))


def _row_vec(value, n):
  return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _causal_mask(s, row0, col0, keys_first: bool = False):
  """s [R, C] (WGMMA layout) holds rows row0.. and columns col0..: queries by keys (MASKED where key > query), or
  with `keys_first` keys by queries. The positions come from two 1-D iotas broadcast in registers: full [R, C]
  iotas are loop-invariant, get hoisted out of the loop and hold two tiles of registers for its whole length."""
  r = plgpu.broadcasted_iota(jnp.int32, (s.shape[0],), 0, layout=plgpu.Layout.WGMMA.reduce(1)) + (row0 - col0)
  c = plgpu.broadcasted_iota(jnp.int32, (s.shape[1],), 0, layout=plgpu.Layout.WGMMA.reduce(0))
  r, c = lax.broadcast_in_dim(r, s.shape, [0]), lax.broadcast_in_dim(c, s.shape, [1])
  return jnp.where(c >= r if keys_first else r >= c, s, MASKED)


def _drain(free, steps, stages: int):
  """The producer waits for the consumers' last release of every slot it filled, so that each phase of the "free"
  barriers is observed before the kernel ends (the interpreter checks it; on the GPU it only idles the producer,
  which has nothing left to load)."""
  def wait(n, _):
    @pl.when(n >= stages)
    def _():
      plgpu.barrier_wait(free.at[lax.rem(n, jnp.int32(stages))])
  lax.fori_loop(steps, steps + stages, wait, None)


def _producer(free, steps, stages: int, copies):
  """The producer warpgroup: for each step n, once both compute warpgroups have released the slot's previous
  contents, `copies(n, slot)` starts the step's TMA copies into that slot."""
  plgpu.set_max_registers(40, action="decrease")

  def load(n, _):
    slot = lax.rem(n, jnp.int32(stages))

    @pl.when(n >= stages)
    def _():
      plgpu.barrier_wait(free.at[slot])
    copies(n, slot)
  lax.fori_loop(0, steps, load, None)
  _drain(free, steps, stages)


def _kv_copies(k_ref, v_ref, k_sm, v_sm, k_bar, v_bar, b, kh, bk: int):
  """Step i's K and V blocks (keys i*bk ...) of K/V head kh into a slot (forward, dq)."""
  def copies(i, slot):
    rows = pl.ds(i * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh], k_sm.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v_sm.at[slot], v_bar.at[slot])
  return copies


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), jnp.int32(b))


def _grid(axes: dict[str, int], work: str, p: MosaicParams):
  """(grid, grid_names) of a kernel whose causal work per CTA shrinks or grows along axis `work`.

  Mosaic GPU launches its grid row-major (the last axis is CUDA's x, the fastest in launch order), so by default
  the CTAs start as a sawtooth: every (batch, head) pair runs its `work` axis through in turn. `heavy_first` puts
  `work` first (slowest): all of its longest CTAs start before any shorter one (longest-processing-time-first,
  as FlashAttention-3's tile scheduler does), so the last wave is the short CTAs. A count of the causal steps per
  CTA, each CTA started on the first SM to free up in launch order (one CTA per SM), puts the dk / dv kernel's
  makespan at 1.50x the balanced one with the sawtooth at B 2, 12/2 heads, 8K (256 CTAs on 132 SMs: one key
  block 0 CTA alone is a whole SM's share, and the last group's start late) and 1.24x at B 4, 14/2, d 64 with
  128-row blocks; longest first, 1.01x. The forward's and dq's sawtooth: 1.10x. Measured (H200, session 9, fwd+bwd
  against cuDNN in interleaved rounds): 0.90x -> 1.10x at B 2, 12/2, d 128; 1.00x -> 1.15x at B 4, 14/2, d 64."""
  if p.blocks.heavy_first and p.causal:
    axes = {work: axes[work], **{n: v for n, v in axes.items() if n != work}}
  return tuple(axes.values()), tuple(axes)


def _kernel(body, out_type, scratch, grid, names, p: MosaicParams):
  """The Mosaic GPU kernel of `body`, named after the function that defines it (mosaic_flash_forward / _dq /
  _dkv: profiles file the names under attention, efficientllm_jax/bench/profile.py)."""
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names,
                      num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=plgpu.InterpretGPUParams() if p.interpret else None,
                      kernel_name="mosaic_flash" + body.__qualname__.split(".")[0])


def _dims(q, k):
  """(B, T, H, D, S, K, G) of q [B, T, H, D] and k [B, S, K, D]."""
  b, t, h, d = q.shape
  return b, t, h, d, k.shape[1], k.shape[2], h // k.shape[2]


def _row_cta(g_: int, bk: int, s_len: int, p: MosaicParams):
  """Inside a forward / dq kernel: (batch, query head, row block, warpgroup, K/V head, key blocks to visit). With
  `heavy_first` the row blocks run last to first: causally the last has the most keys to visit."""
  b, h, qi, wg = (lax.axis_index(n) for n in ("b", "h", "q", "wg"))
  causal = p.causal
  if causal and p.blocks.heavy_first:
    qi = jnp.int32(s_len // (2 * ROWS) - 1) - qi
  steps = _cdiv((qi + 1) * (2 * ROWS), bk) if causal else s_len // bk
  return b, h, qi, wg, lax.div(h, jnp.int32(g_)), steps


# ----- forward -----

def _forward(q, k, v, p: MosaicParams):
  b_, t, h_, d, s_len, _, g_ = _dims(q, k)
  bk, stages, c, dtype = p.blocks.fwd_k, _fwd_stages(p.blocks), p.scale * LOG2E, q.dtype

  def body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_sm, k_sm, v_sm, lse_sm, q_bar, k_bar, v_bar, free, turn_bar):
    b, h, qi, wg, kh, steps = _row_cta(g_, bk, s_len, p)

    def turn():  # ping-pong: both warpgroups pass this point together (see the loop below)
      plgpu.barrier_arrive(turn_bar)
      plgpu.barrier_wait(turn_bar)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      row0 = qi * (2 * ROWS) + wg * ROWS
      qs = q_sm.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), h], qs, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])

      # The two warpgroups take turns on the tensor cores (FlashAttention-3's ping-pong): warpgroup 1 starts one
      # turn behind, so one warpgroup's softmax runs while the other's two products run. Every step takes two
      # turns per warpgroup: after issuing q k^T, and between its softmax and p v.
      pl.when(wg == 1)(turn)

      def step(i, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])
        if p.interpret:
          s = _mma(None, qs, k_sm.at[slot].transpose((1, 0)), (ROWS, bk), True)
          turn()
        else:
          def qk(ref):
            plgpu.wgmma(ref, qs, k_sm.at[slot].transpose((1, 0)))
            turn()
            return ref[...]
          s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
        if masked:
          s = _causal_mask(s, row0, i * bk)
        # m is the row maximum of the unscaled logits, so the scale and the subtraction are one FMA per element
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2((m - m_new) * c)
        pr = jnp.exp2(s * c - lax.broadcast_in_dim(m_new * c, s.shape, [0]))
        l = l * alpha + pr.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_arrive(turn_bar)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(turn_bar)
        acc = _mma(acc, pr.astype(dtype), v_sm.at[slot], (ROWS, d), p.interpret)
        plgpu.barrier_arrive(free.at[slot])
        return acc, m_new, l

      carry = (_zeros((ROWS, d)), _row_vec(MASKED, ROWS), _row_vec(0.0, ROWS))
      # causal: blocks wholly at or below the diagonal need no mask (the two warpgroups differ in how many, and
      # run the same number of steps in all)
      full = lax.div(row0, jnp.int32(bk)) if p.causal else steps
      carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)
      pl.when(wg == 0)(turn)
      qs[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
      lse_sm.at[wg][...] = m * c + jnp.log2(l)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, o_ref.at[b, pl.ds(row0, ROWS), h])
      plgpu.copy_smem_to_gmem(lse_sm.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS)])
      plgpu.wait_smem_to_gmem(0)

    pl.when(wg == 2)(lambda: _producer(free, steps, stages,
                                       _kv_copies(k_ref, v_ref, k_sm, v_sm, k_bar, v_bar, b, kh, bk)))

  scratch = [plgpu.SMEM((2, ROWS, d), dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bk, d), dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bk, d), dtype, transforms=_tiles()),
             plgpu.SMEM((2, ROWS), jnp.float32),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2)]
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b_, h_, t), jnp.float32))
  return _kernel(body, out_type, scratch, *_grid({"b": b_, "h": h_, "q": t // (2 * ROWS)}, "q", p), p)(q, k, v)


# ----- dq -----

def _dq(q, k, v, do, lse, delta, p: MosaicParams):
  b_, t, h_, d, s_len, _, g_ = _dims(q, k)
  bk, stages, c, dtype = p.blocks.dq_k, p.blocks.stages, p.scale * LOG2E, q.dtype

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_sm, do_sm, lse_sm, delta_sm, k_sm, v_sm,
           row_bar, k_bar, v_bar, free):
    b, h, qi, wg, kh, steps = _row_cta(g_, bk, s_len, p)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      row0 = qi * (2 * ROWS) + wg * ROWS
      qs, dos, lses, deltas = q_sm.at[wg], do_sm.at[wg], lse_sm.at[wg], delta_sm.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), h], qs, row_bar.at[wg * 4])
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, ROWS), h], dos, row_bar.at[wg * 4 + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, ROWS)], lses, row_bar.at[wg * 4 + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(row0, ROWS)], deltas, row_bar.at[wg * 4 + 3])
      for j in range(4):
        plgpu.barrier_wait(row_bar.at[wg * 4 + j])
      lse_r = plgpu.load(lses, layout=plgpu.Layout.WGMMA.reduce(1))
      delta_r = plgpu.load(deltas, layout=plgpu.Layout.WGMMA.reduce(1))

      def step(i, dq, masked: bool):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        # q k^T and dO v^T issued together, one wait
        s, dp = _mma_group([(None, qs, k_sm.at[slot].transpose((1, 0)), (ROWS, bk)),
                            (None, dos, v_sm.at[slot].transpose((1, 0)), (ROWS, bk))], p.interpret)
        if masked:
          s = _causal_mask(s, row0, i * bk)
        pr = jnp.exp2(s * c - lax.broadcast_in_dim(lse_r, s.shape, [0]))
        ds = pr * (dp - lax.broadcast_in_dim(delta_r, dp.shape, [0]))
        dq = _mma(dq, ds.astype(dtype), k_sm.at[slot], (ROWS, d), p.interpret)
        plgpu.barrier_arrive(free.at[slot])
        return dq

      full = lax.div(row0, jnp.int32(bk)) if p.causal else steps  # blocks that need no causal mask
      dq = lax.fori_loop(0, full, functools.partial(step, masked=False), _zeros((ROWS, d)))
      dq = lax.fori_loop(full, steps, functools.partial(step, masked=True), dq)
      qs[...] = (dq * p.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, dq_ref.at[b, pl.ds(row0, ROWS), h])
      plgpu.wait_smem_to_gmem(0)

    pl.when(wg == 2)(lambda: _producer(free, steps, stages,
                                       _kv_copies(k_ref, v_ref, k_sm, v_sm, k_bar, v_bar, b, kh, bk)))

  scratch = [plgpu.SMEM((2, ROWS, d), dtype, transforms=_tiles()),
             plgpu.SMEM((2, ROWS, d), dtype, transforms=_tiles()),
             plgpu.SMEM((2, ROWS), jnp.float32), plgpu.SMEM((2, ROWS), jnp.float32),
             plgpu.SMEM((stages, bk, d), dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bk, d), dtype, transforms=_tiles()),
             plgpu.Barrier(num_barriers=8), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
  return _kernel(body, jax.ShapeDtypeStruct(q.shape, dtype), scratch,
                 *_grid({"b": b_, "h": h_, "q": t // (2 * ROWS)}, "q", p), p)(q, k, v, do, lse, delta)


# ----- dk, dv (and with fused_dq, dq) -----

def _dq_split(d: int, blocks: MosaicBlocks) -> str:
  """How the fused backward's two warpgroups share each step's dq product dS [bq, 128 keys] @ K [128 keys, D]:
  "rows" (128-row query blocks: each takes its 64 rows, all of D), "cols" (d 128: each takes all bq rows and half
  of D, FlashAttention-3's split) or "turns" (one warpgroup takes the whole product, alternating by step)."""
  if blocks.dkv_q == 2 * ROWS:
    return "rows"
  return "cols" if d == 128 else "turns"


def _dq_block(d: int, blocks: MosaicBlocks) -> tuple[int, int]:
  """(rows, columns) of a warpgroup's dq block in the fused backward."""
  return {"rows": (ROWS, d), "cols": (blocks.dkv_q, d // 2), "turns": (blocks.dkv_q, d)}[_dq_split(d, blocks)]


def _dkv(q, k, v, do, lse, delta, p: MosaicParams):
  """dk, dv: each warpgroup keeps 64 keys' K and V and accumulates their dk, dv over every (query head of the
  group, query block) step. Returns (dq, dk, dv) with dq None unless `fused_dq`: then the two warpgroups' dS^T
  blocks meet in shared memory each step ([128 keys, bq queries], two slots) and their transpose is multiplied by
  the CTA's 128 keys, shared between the warpgroups as `_dq_split` says. A TMA reduce-add puts each warpgroup's
  product into an fp32 dq buffer."""
  b_, t, _, d, s_len, kh_, g_ = _dims(q, k)
  bq, stages, fused = p.blocks.dkv_q, p.blocks.stages, p.blocks.fused_dq
  how = _dq_split(d, p.blocks) if fused else None
  dq_rows, dq_cols = _dq_block(d, p.blocks)
  nq = t // bq
  c = p.scale * LOG2E
  dtype = q.dtype

  def body(*refs):
    if fused:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, k_sm, v_sm, q_sm, do_sm, lse_sm,
       delta_sm, ds_sm, dq_sm, kv_bar, q_bar, do_bar, lse_bar, delta_bar, free, ds_bar, end, *interp) = refs
    else:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_sm, v_sm, q_sm, do_sm, lse_sm, delta_sm,
       kv_bar, q_bar, do_bar, lse_bar, delta_bar, free) = refs
    b, kh, ki, wg = (lax.axis_index(n) for n in ("b", "kh", "k", "wg"))
    j0 = lax.div(ki * (2 * ROWS), jnp.int32(bq)) if p.causal else jnp.int32(0)
    per_head = nq - j0
    steps = g_ * per_head

    def block(n):  # step n -> (query head, first query row)
      return kh * g_ + lax.div(n, per_head), (j0 + lax.rem(n, per_head)) * bq

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      col0 = ki * (2 * ROWS) + wg * ROWS  # this warpgroup's first key
      # fused: one [128, D] K buffer, since the dq product reads both warpgroups' keys. The other half has landed
      # once the other warpgroup passes the first ds barrier: it waits for its own keys before the loop.
      ks, vs = ((k_sm.at[pl.ds(wg * ROWS, ROWS)], v_sm.at[pl.ds(wg * ROWS, ROWS)]) if fused
                else (k_sm.at[wg], v_sm.at[wg]))
      plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(col0, ROWS), kh], ks, kv_bar.at[wg * 2])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(col0, ROWS), kh], vs, kv_bar.at[wg * 2 + 1])
      plgpu.barrier_wait(kv_bar.at[wg * 2])
      plgpu.barrier_wait(kv_bar.at[wg * 2 + 1])

      def step(m, carry, head_i, masked: bool):
        dk, dv = carry
        n = head_i * per_head + m
        slot = lax.rem(n, jnp.int32(stages))
        head, row0 = block(n)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        # k q^T and v dO^T issued together, one wait
        st, dpt = _mma_group([(None, ks, q_sm.at[slot].transpose((1, 0)), (ROWS, bq)),
                              (None, vs, do_sm.at[slot].transpose((1, 0)), (ROWS, bq))], p.interpret)
        if masked:  # on the unscaled logits: the scale and the lse subtraction below are one FMA
          st = _causal_mask(st, col0, row0, keys_first=True)
        plgpu.barrier_wait(lse_bar.at[slot])
        lse_c = plgpu.load(lse_sm.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse_c, st.shape, [1]))  # P^T [keys, queries]
        half = lax.rem(n, jnp.int32(2))  # fused: this step's dS^T slot

        def ds_t():  # dS^T [keys, queries]; fused: also into shared memory for the dq product
          plgpu.barrier_wait(delta_bar.at[slot])
          delta_c = plgpu.load(delta_sm.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
          dst = (pt * (dpt - lax.broadcast_in_dim(delta_c, dpt.shape, [1]))).astype(dtype)
          if fused:
            ds_sm.at[half, pl.ds(wg * ROWS, ROWS)][...] = dst
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_bar.at[half])
          return dst

        def ds_both(rows=None):  # fused: dS [bq (or its `rows`), 128 keys] of both warpgroups, once the other
          plgpu.barrier_wait(ds_bar.at[half])  # warpgroup's half has landed
          return (ds_sm.at[half] if rows is None else ds_sm.at[half, :, rows]).transpose((1, 0))

        # dv's product runs while dS^T is formed (overlap), then dk's (and with the split dq, this warpgroup's
        # part of dq = dS @ K); one wait for all
        products = [(dv, pt.astype(dtype), do_sm.at[slot], (ROWS, d)),
                    (dk, ds_t if p.blocks.overlap else ds_t(), q_sm.at[slot], (ROWS, d))]
        if how in ("rows", "cols"):
          if how == "cols":  # all bq rows, this warpgroup's half of D
            cols = pl.ds(wg * dq_cols, dq_cols)
            dq_b, dq_block = k_sm.at[:, cols], (b, pl.ds(row0, bq), head, cols)
            ds_rows = ds_both
          else:  # this warpgroup's 64 rows of the 128-row query block, all of D
            dq_b, dq_block = k_sm, (b, pl.ds(row0 + wg * ROWS, ROWS), head)
            ds_rows = functools.partial(ds_both, pl.ds(wg * ROWS, ROWS))
          if p.interpret:
            dv, dk = _mma_group(products, True)
            _dq_out(_mma(None, ds_rows(), dq_b, (dq_rows, dq_cols), True), wg, dq_ref.at[dq_block])
          else:
            def issue(refs):
              # the dq accumulator is allocated only here, once dS^T is formed and pt, dpt are dead (allocated
              # up front beside dv and dk it spilled 496 bytes at d 128; here 256 with session 8's masks)
              for ref, (_, a, b_op, _) in zip(refs, products):
                plgpu.wgmma(ref, a() if callable(a) else a, b_op)
              ds = ds_rows()

              def dq_product(acc):
                plgpu.wgmma(acc, ds, dq_b)
                _dq_out(acc[...], wg, dq_ref.at[dq_block])  # reading acc waits for all three products
              pl.run_scoped(dq_product, plgpu.ACC((dq_rows, dq_cols), jnp.float32))
            dv, dk = pl.run_state(issue)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        else:
          dv, dk = _mma_group(products, p.interpret)
        plgpu.barrier_arrive(free.at[slot])  # q, dO, lse, delta of this slot are no longer read
        if how == "turns":
          ds = ds_both()

          @pl.when(half == wg)
          def _():
            dq = _mma(None, ds, k_sm, (bq, d), p.interpret)
            _dq_out(dq, wg, dq_ref.at[b, pl.ds(row0, bq), head])
        return dk, dv

      def _dq_out(dq, wg, dst_ref):
        """Adds this warpgroup's dq block (fp32 registers) into dq_ref's block."""
        dq = dq * p.scale
        if p.interpret:  # no TMA reduction in the interpreter: read, add, write (its grid runs sequentially)
          tmp, (bar,) = dq_sm, interp
          plgpu.copy_gmem_to_smem(dst_ref, tmp.at[wg], bar.at[wg])
          plgpu.barrier_wait(bar.at[wg])
          tmp.at[wg][...] = tmp.at[wg][...] + dq
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(tmp.at[wg], dst_ref)
          plgpu.wait_smem_to_gmem(0)
        else:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this warpgroup's previous reduce has read dq_sm
          dq_sm.at[wg][...] = dq
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(dq_sm.at[wg], dst_ref, reduction_op="add")

      def head_loop(head_i, carry):
        # causal: a query block that starts at or before this warpgroup's first key straddles the diagonal (the
        # first one or two of every head); later blocks need no mask
        masked = lax.min(lax.div(wg * ROWS, jnp.int32(bq)) + 1, per_head) if p.causal else jnp.int32(0)
        carry = lax.fori_loop(0, masked, functools.partial(step, head_i=head_i, masked=True), carry)
        return lax.fori_loop(masked, per_head, functools.partial(step, head_i=head_i, masked=False), carry)

      dk, dv = lax.fori_loop(0, g_, head_loop, (_zeros((ROWS, d)), _zeros((ROWS, d))))
      if fused:
        plgpu.wait_smem_to_gmem(0)
        plgpu.barrier_arrive(end.at[0])  # the other warpgroup's last dq product may still read this half of k_sm
        plgpu.barrier_wait(end.at[0])
      ks[...] = (dk * p.scale).astype(dtype)
      vs[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ks, dk_ref.at[b, pl.ds(col0, ROWS), kh])
      plgpu.copy_smem_to_gmem(vs, dv_ref.at[b, pl.ds(col0, ROWS), kh])
      plgpu.wait_smem_to_gmem(0)

    def copies(n, slot):
      head, row0 = block(n)
      rows = pl.ds(row0, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_sm.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_sm.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_sm.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, head, rows], delta_sm.at[slot], delta_bar.at[slot])
    pl.when(wg == 2)(lambda: _producer(free, steps, stages, copies))

  kv_shape = (2 * ROWS, d) if fused else (2, ROWS, d)
  buffers = [plgpu.SMEM(kv_shape, dtype, transforms=_tiles()), plgpu.SMEM(kv_shape, dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bq, d), dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bq, d), dtype, transforms=_tiles()),
             plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)]
  barriers = [plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
  out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  grid = _grid({"b": b_, "kh": kh_, "k": s_len // (2 * ROWS)}, "k", p)  # causally, key block 0 has the most work
  if not fused:
    return (None, *_kernel(body, out_type, buffers + barriers, *grid, p)(q, k, v, do, lse, delta))
  # dS^T of both warpgroups (two slots), and each warpgroup's dq block for the TMA reduce-add (in the interpreter:
  # its staging buffer for a read-add-write, with a load barrier per warpgroup)
  buffers += [plgpu.SMEM((2, 2 * ROWS, bq), dtype, transforms=_tiles()),
              plgpu.SMEM((2, dq_rows, dq_cols), jnp.float32)]
  barriers += [plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=1)]
  interp = [plgpu.Barrier(num_barriers=2)] if p.interpret else []
  dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
  dk, dv = _kernel(body, out_type, buffers + barriers + interp, *grid, p)(
      q, k, v, do, lse, delta, dq_acc)
  return dq_acc[...], dk, dv


# ----- custom VJP -----

SMEM_BYTES = 232448  # shared memory a Hopper CTA may use (227 KB)


def _smem_bytes(d: int, itemsize: int, blocks: MosaicBlocks) -> dict[str, int]:
  """Shared memory of each kernel's scratch buffers. Mosaic GPU adds barriers and alignment padding (up to ~1 KB
  measured), so a sum just under the limit can still fail to compile, with Mosaic's own message."""
  st, bq = blocks.stages, blocks.dkv_q
  fused = 2 * 2 * ROWS * bq * itemsize + 2 * math.prod(_dq_block(d, blocks)) * 4 if blocks.fused_dq else 0
  return {
      "forward": (2 * ROWS * d + 2 * _fwd_stages(blocks) * blocks.fwd_k * d) * itemsize + 2 * ROWS * 4,
      "dq": (4 * ROWS * d + 2 * st * blocks.dq_k * d) * itemsize + 4 * ROWS * 4,
      "dk / dv": (4 * ROWS * d + 2 * st * bq * d) * itemsize + 2 * st * bq * 4 + fused,
  }


def _fwd_stages(blocks: MosaicBlocks) -> int:
  return blocks.fwd_stages or blocks.stages


def _smem_misfit(d: int, itemsize: int, blocks: MosaicBlocks) -> str | None:
  for kernel, n in _smem_bytes(d, itemsize, blocks).items():
    if n > SMEM_BYTES:
      return (f"{blocks} needs {n / 1024:.0f} KB of shared memory in the {kernel} kernel at d {d}, more than the "
              f"{SMEM_BYTES // 1024} KB of a Hopper SM: lower its block sizes or stages")
  return None


def mosaic_attention(q, k, v, params: MosaicParams):
  """softmax(scale * q k^T) v per head with the Mosaic GPU kernels (see the module docstring); raises ValueError
  with the reason for a call they cannot take (`unsupported`, block sizes other than 64 / 128, blocks whose buffers
  overflow shared memory)."""
  why = unsupported(q, k, v)
  blocks = params.blocks
  if why is None and (blocks.fwd_k not in (64, 128, 256) or not {blocks.dq_k, blocks.dkv_q} <= {64, 128}):
    why = (f"MosaicBlocks fwd_k must be 64, 128 or 256 and dq_k / dkv_q 64 or 128 (got {blocks.fwd_k} / "
           f"{blocks.dq_k} / {blocks.dkv_q})")
  if why is None and q.shape[1] % blocks.fwd_k:
    why = f"MosaicBlocks fwd_k={blocks.fwd_k} needs a sequence length that is a multiple of it (got {q.shape[1]})"
  if why is None and (blocks.stages < 1 or blocks.fwd_stages < 0):
    why = f"MosaicBlocks.stages must be at least 1 and fwd_stages 0 or more (got {blocks.stages} / {blocks.fwd_stages})"
  if why is None:
    why = _smem_misfit(q.shape[-1], q.dtype.itemsize, blocks)
  if why:
    raise ValueError(why)
  return _attention(q, k, v, params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, params: MosaicParams):
  return _forward(q, k, v, params)[0]


def _fwd(q, k, v, params):
  o, lse = _forward(q, k, v, params)
  return o, (q, k, v, o, lse)


def _bwd(params, res, do):
  q, k, v, o, lse = res
  do = do.astype(q.dtype)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _dkv(q, k, v, do, lse, delta, params)
  dq = _dq(q, k, v, do, lse, delta, params) if dq is None else dq.astype(q.dtype)
  return dq, dk, dv


_attention.defvjp(_fwd, _bwd)
