"""NSA: Native Sparse Attention (DeepSeek, arXiv 2502.11089), pure-JAX reference.

  o_t = g_cmp * Attn(q_t, compressed K/V) + g_slc * Attn(q_t, selected blocks) + g_win * Attn(q_t, last w tokens)

Three branches share the query and the output projection; each has its own K/V projections (the paper's guard
against shortcut learning between branches). Gates are sigmoid(linear(x)), one per branch and query head.

- Compressed: overlapping blocks of l tokens at stride d (block i = tokens [i*d, i*d + l)); each block's keys and
  values, plus a learned intra-block position embedding, go through a per-kv-head MLP phi (flattened block ->
  head_dim -> head_dim) to one token. Query t sees block i only when it has ended: i*d + l - 1 <= t. Queries
  before the first block ends see nothing and get a zero output from this branch (no NaN).
- Selected: importance = the compressed branch's softmax probabilities, summed over the query heads of a GQA
  group (one selection per group), remapped to selection blocks of l' tokens by weighting each compressed block
  with its overlap with the selection block (in units of d: the paper's Eq. 9). The first block and the
  `local_blocks` blocks ending at the query's own block are always taken; the rest of the n are the top scores
  among visible blocks. Top-k is not differentiable (scores under stop_gradient). Attention runs over the raw
  tokens of the chosen blocks, causally masked inside the current block.
- Window: ordinary causal attention over the last w tokens through `ops.attention` (cuDNN where it applies).

Positions. RoPE (if the position context has one) rotates the query and the selected / window keys at their
token positions, as in full attention. Compressed keys are built from *unrotated* keys (phi sees intra-block
positions through its own embedding) and the compressed key of block i is then rotated at the position of the
block's last token, i*d + l - 1, the moment it becomes visible (XunhaoLai's NSA rotates at the block start;
lucidrains' does not rotate compressed keys; the paper does not say). A logit-bias context (relative / ALiBi) is
applied in every branch at the same key positions.

Memory. The compressed and selected branches run over query chunks of C tokens in a rematerialised scan, so the
live set is the chunk's gathered blocks [B, kv, C, n, l', hd] and its [B, H, C, T/d] compressed scores; nothing
is [T, T]. C is `attention.nsa.query_chunk`, or chosen so a chunk's gathered keys stay near 2^27 numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficientllm_jax import config as config_lib
from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import ops
from efficientllm_jax.models.layers import dense, dtype, normal_init, zeros_init
from efficientllm_jax.models.positional import PositionContext, rotate

GATHER_BUDGET = 2 ** 27  # numbers in one chunk's gathered selected keys (bf16: 256 MiB), when query_chunk = 0
BRANCHES = ("cmp", "slc", "win")


# ---------------------------------------------------------------------------------------------------------------
# Static geometry (python ints / numpy): block counts, score remap, attended-token counts.

def num_compressed(t_len: int, block: int, stride: int) -> int:
  """Number of compression blocks that fit entirely in t_len tokens."""
  return (t_len - block) // stride + 1 if t_len >= block else 0


def selection_weights(t_len: int, block: int, stride: int, select_block: int) -> np.ndarray:
  """[num_compressed, num_selection_blocks] float32: overlap of compressed block i with selection block j, in
  units of the stride (Eq. 9 of the paper: each selection block sums the compressed blocks that overlap it)."""
  nc, ns = num_compressed(t_len, block, stride), -(-t_len // select_block)
  c0 = np.arange(nc)[:, None] * stride
  s0 = np.arange(ns)[None, :] * select_block
  overlap = np.minimum(c0 + block, s0 + select_block) - np.maximum(c0, s0)
  return (np.maximum(overlap, 0) / stride).astype(np.float32)


def attended_tokens(t_len: int, *, compress_block: int, compress_stride: int, select_block: int,
                    num_selected: int, window: int) -> dict[str, np.ndarray]:
  """Keys each query t = 0..t_len-1 attends to, per branch (the FLOPs convention: NSA counts attended tokens).

  cmp: compressed tokens whose block ended at or before t: max(0, floor((t + 1 - l) / d) + 1).
  slc: raw tokens of min(n, t // l' + 1) selected blocks, the current one only up to t:
       (min(n, t // l' + 1) - 1) * l' + t % l' + 1.
  win: min(w, t + 1).
  """
  t = np.arange(t_len, dtype=np.int64)
  cmp = np.maximum(0, (t + 1 - compress_block) // compress_stride + 1)
  cur = t // select_block
  slc = (np.minimum(num_selected, cur + 1) - 1) * select_block + t % select_block + 1
  win = np.minimum(window, t + 1)
  return {"cmp": cmp, "slc": slc, "win": win}


def auto_query_chunk(t_len: int, per_query: int) -> int:
  """Largest power of two C <= t_len (rounded up to a power of two) with C * per_query <= GATHER_BUDGET."""
  c = max(1, GATHER_BUDGET // max(per_query, 1))
  c = 1 << (c.bit_length() - 1)
  return max(1, min(c, 1 << max(0, (t_len - 1).bit_length())))


# ---------------------------------------------------------------------------------------------------------------
# Pure functions of arrays (tests call these with hand-made q / k / v).

def masked_softmax(logits, mask, axes):
  """Softmax over `axes` restricted to `mask`; a row with nothing visible is all zeros (not NaN)."""
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  s = jnp.sum(e, axis=axes, keepdims=True)
  return e / jnp.where(s > 0, s, 1.0)


def compress_blocks(x_btkd, block: int, stride: int):
  """[B, T, K, D] -> [B, Nc, l, K, D]: block i = tokens [i*stride, i*stride + block) (slices, no gather)."""
  b, t, k, d = x_btkd.shape
  nc = num_compressed(t, block, stride)
  assert block % stride == 0, "compress_block must be a multiple of compress_stride"
  parts = [x_btkd[:, r * stride: r * stride + nc * stride].reshape(b, nc, stride, k, d)
           for r in range(block // stride)]
  return jnp.stack(parts, axis=2).reshape(b, nc, block, k, d)


def _bias_at(bias, q_pos_c, k_pos_s, kv: int):
  """bias.dense(q_pos, k_pos) [H, C, S] fp32 -> [KV, G, C, S]."""
  b_hcs = bias.dense(q_pos_c, k_pos_s).astype(jnp.float32)
  return b_hcs.reshape(kv, -1, *b_hcs.shape[1:])


def _chunk(q_bckgd, q_pos_c, kc_bnkd, vc_bnkd, cmp_end_n, ks_bskld, vs_bskld, sel_w_ns, *, select_block: int,
           num_selected: int, local_blocks: int, scale: float, bias, t_pad: int):
  """Compressed + selected attention for one chunk of queries (positions q_pos_c).

  Returns o_cmp, o_slc [B, C, K, G, D] and the selected block ids [B, K, C, n'] (n' = min(n, #blocks);
  id -1 marks an unused slot when fewer than n' blocks are visible)."""
  kv = q_bckgd.shape[2]
  # (a) compressed branch: fp32 logits over every compressed token, masked to blocks that have ended.
  logits = jnp.einsum("bckgd,bnkd->bkgcn", q_bckgd, kc_bnkd, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + _bias_at(bias, q_pos_c, cmp_end_n, kv)[None]
  visible_cn = cmp_end_n[None, :] <= q_pos_c[:, None]
  if kc_bnkd.shape[1]:
    p_cmp = masked_softmax(logits, visible_cn[None, None, None], axes=-1)
  else:  # shorter than one compression block: nothing to attend to, no scores
    p_cmp = logits
  o_cmp = jnp.einsum("bkgcn,bnkd->bckgd", p_cmp.astype(vc_bnkd.dtype), vc_bnkd,
                     preferred_element_type=jnp.float32)

  # (b) selection: group-summed compressed probabilities remapped to selection blocks; not differentiable.
  score_bkcs = jnp.einsum("bkgcn,ns->bkcs", jax.lax.stop_gradient(p_cmp), sel_w_ns)
  idx_bkcn = select_blocks(score_bkcs, q_pos_c, select_block=select_block, num_selected=num_selected,
                           local_blocks=local_blocks)
  used_bkcn = idx_bkcn >= 0
  idx_bkcn = jnp.maximum(idx_bkcn, 0)  # unused slots gather block 0, masked below

  # (c) selected branch: gather the chosen blocks per (batch, kv head, query), shared by the group's heads.
  gather = jax.vmap(jax.vmap(lambda blocks, ids: blocks[ids]))  # [S, l', D][C, n] -> [C, n, l', D]
  kg = gather(ks_bskld, idx_bkcn)
  vg = gather(vs_bskld, idx_bkcn)
  tok_bkcnl = idx_bkcn[..., None] * select_block + jnp.arange(select_block)
  mask_bkcnl = used_bkcn[..., None] & (tok_bkcnl <= q_pos_c[None, None, :, None, None])
  logits = jnp.einsum("bckgd,bkcnld->bkgcnl", q_bckgd, kg, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    b_kgct = _bias_at(bias, q_pos_c, jnp.arange(t_pad), kv)
    take = jax.vmap(jax.vmap(lambda b_gt, tok_nl: b_gt[:, tok_nl], in_axes=(1, 0), out_axes=1))  # over c, k
    logits = logits + jax.vmap(lambda tok_kcnl: take(b_kgct, tok_kcnl))(tok_bkcnl)
  p_slc = masked_softmax(logits, mask_bkcnl[:, :, None], axes=(-2, -1))
  o_slc = jnp.einsum("bkgcnl,bkcnld->bckgd", p_slc.astype(vg.dtype), vg, preferred_element_type=jnp.float32)
  return o_cmp, o_slc, jnp.where(used_bkcn, idx_bkcn, -1)


def select_blocks(score_bkcs, q_pos_c, *, select_block: int, num_selected: int, local_blocks: int):
  """Top-n selection blocks per query from scores [B, K, C, S]: the first block and the `local_blocks` blocks
  ending at the query's own block are forced, future blocks excluded. Returns ids [B, K, C, n'] (n' = min(n, S)),
  -1 where fewer than n' blocks are visible."""
  ns = score_bkcs.shape[-1]
  blk_s = jnp.arange(ns)
  cur_c = q_pos_c // select_block
  future_cs = blk_s[None, :] > cur_c[:, None]
  forced_cs = (blk_s[None, :] == 0) | ((blk_s[None, :] <= cur_c[:, None])
                                       & (blk_s[None, :] > cur_c[:, None] - local_blocks))
  score_bkcs = jnp.where(forced_cs, jnp.inf, score_bkcs)
  score_bkcs = jnp.where(future_cs, -jnp.inf, score_bkcs)
  top_v, idx_bkcn = jax.lax.top_k(score_bkcs, min(num_selected, ns))
  return jnp.where(top_v > -jnp.inf, idx_bkcn, -1)


def sparse_branches_pallas(q_bthd, kc_bnkd, vc_bnkd, ks_bskd, vs_bskd, *, compress_block: int,
                           compress_stride: int, select_block: int, num_selected: int, local_blocks: int,
                           scale: float | None = None, blocks=None):
  """sparse_branches through the Pallas kernels (kernels/nsa): the compressed branch returns its logsumexp, a
  second kernel turns it into group-summed selection scores and keeps their top n per token in registers (the ids
  of select_blocks), and the selected branch gathers only the chosen blocks. Same outputs as sparse_branches (no
  logit bias)."""
  from efficientllm_jax.kernels import nsa as nsa_kernels  # Pallas imports only when used
  blocks = blocks or nsa_kernels.Blocks()
  geom = dict(compress_block=compress_block, compress_stride=compress_stride, scale=scale, blocks=blocks)
  o_cmp, lse = nsa_kernels.compressed_attention(q_bthd, kc_bnkd, vc_bnkd, **geom)
  idx = nsa_kernels.select_top(q_bthd, kc_bnkd, lse, select_block=select_block, num_selected=num_selected,
                               local_blocks=local_blocks, **geom)
  o_slc = nsa_kernels.selected_attention(q_bthd, ks_bskd, vs_bskd, idx, select_block=select_block, scale=scale,
                                         blocks=blocks)
  return o_cmp, o_slc, idx


def sparse_branches(q_bthd, kc_bnkd, vc_bnkd, cmp_end_n, ks_bskd, vs_bskd, *, compress_block: int,
                    compress_stride: int, select_block: int, num_selected: int, local_blocks: int,
                    scale: float | None = None, bias=None, query_chunk: int = 0):
  """Compressed and selected branches for queries [B, T, H, D].

  kc/vc: compressed tokens [B, Nc, K, D] (ending at cmp_end_n [Nc]); ks/vs: raw selected-branch keys/values
  [B, T, K, D]. Returns (o_cmp, o_slc) [B, T, H, D] in q's dtype and block ids [B, K, T, n'] (-1 = unused).
  """
  b, t, h, d = q_bthd.shape
  kv = ks_bskd.shape[2]
  g = h // kv
  scale = d ** -0.5 if scale is None else scale
  ns = -(-t // select_block)
  t_pad = ns * select_block
  pad = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
  to_blocks = lambda x: pad(x).reshape(b, ns, select_block, kv, -1).transpose(0, 3, 1, 2, 4)  # [B, K, S, l', D]
  ks_bksld, vs_bksld = to_blocks(ks_bskd), to_blocks(vs_bskd)
  sel_w = jnp.asarray(selection_weights(t, compress_block, compress_stride, select_block))
  if kc_bnkd.shape[1] != sel_w.shape[0]:
    raise ValueError(f"{kc_bnkd.shape[1]} compressed tokens given, {sel_w.shape[0]} expected for T={t}")

  n_eff = min(num_selected, ns)
  chunk = query_chunk or auto_query_chunk(t, b * kv * n_eff * select_block * d)
  chunk = min(chunk, t)
  n_chunks = -(-t // chunk)
  q_pad = jnp.pad(q_bthd, ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0)))
  q_nbckgd = q_pad.reshape(b, n_chunks, chunk, kv, g, d).transpose(1, 0, 2, 3, 4, 5)

  def body(q_bckgd, start):
    return _chunk(q_bckgd, start + jnp.arange(chunk), kc_bnkd, vc_bnkd, cmp_end_n, ks_bksld, vs_bksld, sel_w,
                  select_block=select_block, num_selected=num_selected, local_blocks=local_blocks, scale=scale,
                  bias=bias, t_pad=t_pad)

  starts = jnp.arange(n_chunks) * chunk
  if n_chunks == 1:
    outs = jax.tree.map(lambda x: x[None], body(q_nbckgd[0], starts[0]))
  else:  # rematerialised per chunk: the backward pass keeps only one chunk's gathered blocks alive
    step = jax.checkpoint(body)
    _, outs = jax.lax.scan(lambda carry, xs: (carry, step(*xs)), None, (q_nbckgd, starts))
  o_cmp, o_slc, idx = outs  # [N, B, C, K, G, D] x2, [N, B, K, C, n']
  merge = lambda o: o.transpose(1, 0, 2, 3, 4, 5).reshape(b, n_chunks * chunk, h, d)[:, :t].astype(q_bthd.dtype)
  idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, kv, n_chunks * chunk, -1)[:, :, :t]
  return merge(o_cmp), merge(o_slc), idx


# ---------------------------------------------------------------------------------------------------------------
# The module.

class CompressMLP(nnx.Module):
  """phi: a block of l tokens [l, D] (+ intra-block position embedding) -> one token [D], per kv head.

  Flattened block -> Linear(l*D -> D) -> GELU -> Linear(D -> D); weights per kv head."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.model
    kv, hd, blk = m.num_kv_heads, m.head_dim, cfg.attention.nsa.compress_block
    pdt = dtype(m.param_dtype)
    self.pos = nnx.Param(normal_init(m.init_std, (None, "kv_heads", "head_dim"))(rngs.params(), (blk, kv, hd), pdt))
    self.w1 = nnx.Param(normal_init(m.init_std, ("kv_heads", None, None, "head_dim"))(
        rngs.params(), (kv, blk, hd, hd), pdt))
    self.b1 = nnx.Param(zeros_init(("kv_heads", "head_dim"))(rngs.params(), (kv, hd), pdt))
    self.w2 = nnx.Param(normal_init(m.init_std, ("kv_heads", None, "head_dim"))(rngs.params(), (kv, hd, hd), pdt))
    self.b2 = nnx.Param(zeros_init(("kv_heads", "head_dim"))(rngs.params(), (kv, hd), pdt))
    self.dtype = dtype(m.dtype)

  def __call__(self, blocks_bnlkd):
    c = lambda p: p[...].astype(self.dtype)
    x = blocks_bnlkd + c(self.pos)
    h = jnp.einsum("bnlkd,kldf->bnkf", x, c(self.w1)) + c(self.b1)
    return jnp.einsum("bnkf,kfd->bnkd", jax.nn.gelu(h), c(self.w2)) + c(self.b2)


def resolve_impl(cfg) -> str:
  """attention.nsa.impl: auto = the Pallas kernels on a GPU when the geometry suits them (no logit bias, powers of
  two for the selected block and head dim; validate() rejects an explicit pallas otherwise), else the reference.
  On an H200 the kernels train 0.5B / 1.5B at 8K in 0.33 / 0.41 s a step (the reference took 11.2 / 7.2 s on
  an H100); they are unverified on TPU."""
  impl = str(cfg.attention.nsa.impl)
  if impl != "auto":
    return impl
  fits = config_lib.nsa_kernels_misfit(cfg) is None
  return "pallas" if fits and jax.default_backend() == "gpu" else "reference"


class NSAAttention(nnx.Module):
  """Native sparse attention with the GQA layout of `model` and the geometry of `attention.nsa`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.attention.nsa
    d, h, kv, hd = m.hidden, m.num_heads, m.num_kv_heads, m.head_dim
    self.q = dense(d, (h, hd), ("embed", "heads", "head_dim"), cfg=cfg, rngs=rngs, use_bias=m.qkv_bias)
    kv_proj = lambda: dense(d, (kv, hd), ("embed", "kv_heads", "head_dim"), cfg=cfg, rngs=rngs, use_bias=m.qkv_bias)
    self.k_cmp, self.v_cmp = kv_proj(), kv_proj()
    self.k_slc, self.v_slc = kv_proj(), kv_proj()
    self.k_win, self.v_win = kv_proj(), kv_proj()
    self.phi_k = CompressMLP(cfg, rngs=rngs)
    self.phi_v = CompressMLP(cfg, rngs=rngs)
    self.gate = dense(d, (h, len(BRANCHES)), ("embed", "heads", None), cfg=cfg, rngs=rngs, use_bias=True)
    self.o = dense((h, hd), d, ("heads", "head_dim", "embed"), cfg=cfg, rngs=rngs, axis=(-2, -1))
    self.impl = cfg.attention.impl
    self.geometry = dict(compress_block=int(a.compress_block), compress_stride=int(a.compress_stride),
                         select_block=int(a.select_block), num_selected=int(a.num_selected),
                         local_blocks=int(a.local_blocks))
    self.window = int(a.window)
    self.query_chunk = int(a.query_chunk)
    self.kernel_impl = resolve_impl(cfg)  # reference (sparse_branches) | pallas (kernels/nsa)

  def compressed_kv(self, x_btd, ctx: PositionContext):
    """Compressed keys (rotated at their block's last token) and values [B, Nc, K, D], and those positions."""
    blk, stride = self.geometry["compress_block"], self.geometry["compress_stride"]
    kc = self.phi_k(compress_blocks(self.k_cmp(x_btd), blk, stride))
    vc = self.phi_v(compress_blocks(self.v_cmp(x_btd), blk, stride))
    end_n = jnp.arange(kc.shape[1]) * stride + blk - 1
    if ctx.cos is not None:
      kc = rotate(kc, PositionContext(cos=ctx.cos[:, end_n], sin=ctx.sin[:, end_n]))
    return kc, vc, end_n

  def branches(self, x_btd, ctx: PositionContext):
    """Per-branch outputs {cmp, slc, win} [B, T, H, D], gates [B, T, H, 3] and selected block ids [B, K, T, n']."""
    q = rotate(self.q(x_btd), ctx)
    kc, vc, end_n = self.compressed_kv(x_btd, ctx)
    ks, vs = rotate(self.k_slc(x_btd), ctx), self.v_slc(x_btd)
    if self.kernel_impl == "pallas":
      if ctx.bias is not None:
        raise ValueError("attention.nsa.impl=pallas takes no logit bias (relative / ALiBi): use impl=reference")
      # keep_residuals: remat policies that keep attention kernels (dots_attention, the default) save the kernels'
      # outputs and residuals instead of running the whole sparse forward (both branches, the selection, the
      # lists) again in the backward pass. On a mesh the kernels run per device (ops.per_shard: batch, heads).
      core = functools.partial(ops.per_shard, functools.partial(sparse_branches_pallas, **self.geometry),
                               layouts=("bthd", "bnkd", "bnkd", "bskd", "bskd"), out_layouts=("bthd", "bthd", "bktn"))
      o_cmp, o_slc, idx = remat.keep_residuals(core)(q, kc, vc, ks, vs)
    else:
      o_cmp, o_slc, idx = sparse_branches(q, kc, vc, end_n, ks, vs, bias=ctx.bias, query_chunk=self.query_chunk,
                                          **self.geometry)
    o_win = ops.attention(q, rotate(self.k_win(x_btd), ctx), self.v_win(x_btd), impl=self.impl, bias=ctx.bias,
                          window=self.window)
    gates = jax.nn.sigmoid(self.gate(x_btd).astype(jnp.float32))
    return {"cmp": o_cmp, "slc": o_slc, "win": o_win}, gates, idx

  def __call__(self, x_btd, ctx: PositionContext):
    outs, gates, _ = self.branches(x_btd, ctx)
    g = gates.astype(outs["win"].dtype)
    o_bthd = sum(g[..., i:i + 1] * outs[name] for i, name in enumerate(BRANCHES))
    return self.o(o_bthd)


def param_count(cfg) -> int:
  """Parameters of one NSA layer (for reports; the decoder's param_counts covers the whole model)."""
  layer = nnx.eval_shape(lambda: NSAAttention(cfg, rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(layer, nnx.Param))))
