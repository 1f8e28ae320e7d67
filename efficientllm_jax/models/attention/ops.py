"""The one attention-core dispatch: which kernel computes softmax(q k^T * scale + bias) v, causally.

Variants (gqa.py, mla.py, ...) build q/k/v; `attention()` picks the kernel by `impl`:
  xla    einsum reference in fp32 (any platform, any shape, biases). Above `block_q` queries it runs over query
         blocks (lax.map of a rematerialised block), so the fp32 logits live as [B, H, block_q, S] at a time,
         never [B, H, T, S]; with a sliding window each block reads only its block_q + window - 1 keys.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"), is_causal=True (+ local_window_size), never a
         dense mask. Unequal qk / v head dims (MLA) are zero-padded to the larger one and the output sliced.
  pallas the flash kernel of efficientllm_jax/kernels/flash (Triton lowering on GPU, Mosaic on TPU, interpret mode
         on CPU): GQA-native, windowed, unequal qk / v head dims without padding, relative / ALiBi biases in-kernel
         (bias objects hand it `kernel_terms()`); block sizes from attention.pallas.*.
  mosaic the Mosaic GPU flash kernels of kernels/flash/mosaic.py (Hopper: TMA + wgmma; interpret mode on CPU):
         causal self-attention without bias or window, q/k/v head dims 64 or 128, T a multiple of 128, bf16/fp16;
         anything else is a ConfigError naming the reason. Its backward: `mosaic_blocks`.
  auto   GPU: pallas for a bias measured faster there (ALiBi, T5: `pallas_on_gpu`), else mosaic on one Hopper GPU
         (not on a mesh of several devices: not yet run there) where `mosaic_supports` says it applies and
         `MOSAIC_AUTO_MAX_SEQ` / `MOSAIC_AUTO_MIN_DKV_CTAS` say it was measured faster than cuDNN, else cudnn
         where `cudnn_supports` says it applies, else xla (the reason is logged once);
         TPU: pallas where `pallas_supports` says it applies, else xla; CPU: xla.
Layouts: q [B, T, H, Dqk], k [B, S, K, Dqk], v [B, S, K, Dv] with H % K == 0 (query head h uses K/V head
h // (H / K), the grouping of jax.nn.dot_product_attention). Query i sits at position q_offset + i, key j at j.
A logit bias (relative / ALiBi positions) is an object with `dense(q_pos [t], k_pos [s]) -> [H, t, s]` (fp32,
a pytree); the xla path evaluates it per query block with that block's positions, cuDNN never takes one, the
pallas kernel takes its `kernel_terms()` (kind, distance thresholds, per-head coefficients).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from efficientllm_jax.config import ConfigError
from efficientllm_jax.models import remat
from efficientllm_jax.parallel import sharding as sh

XLA_BLOCK_Q = 512  # queries per block of the chunked xla path: logits of [B, H, 512, S] fp32 at a time
MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked (padding) row stays NaN-free
_logged: set[str] = set()


def _log_once(msg: str, level: int = logging.INFO) -> None:
  if msg not in _logged:
    _logged.add(msg)
    logging.log(level, msg)


def causal_mask(t: int, s: int, window: int = 0, offset: int = 0):
  """[t, s] bool, True where query i (at absolute position offset + i) may see key j."""
  return visible(jnp.arange(t) + offset, jnp.arange(s), s, window)


def visible(q_pos, k_pos, s: int, window: int):
  """[t, s'] bool: key k_pos[j] exists (0 <= k < s), is not in the future, and lies within the window."""
  qi, kj = q_pos[:, None], k_pos[None, :]
  ok = (kj <= qi) & (kj >= 0) & (kj < s)
  if window:
    ok &= kj > qi - window
  return ok


def _attend(q_btkgd, k_bskd, v_bskd, q_pos, k_pos, *, s: int, scale: float, bias, window: int):
  """One block: fp32 logits [B, K, G, t, s'] -> softmax -> [B, t, K, G, Dv] fp32."""
  logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    _, _, kvh, g, _ = q_btkgd.shape
    b_hts = bias.dense(q_pos, jnp.clip(k_pos, 0, s - 1))  # clipped: padded keys are masked below anyway
    logits = logits + b_hts.reshape(kvh, g, *b_hts.shape[1:]).astype(jnp.float32)
  logits = jnp.where(visible(q_pos, k_pos, s, window), logits, MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bskd.dtype), v_bskd, preferred_element_type=jnp.float32)


def xla_attention(q, k, v, *, scale: float, bias=None, window: int = 0, q_offset: int = 0,
                  block_q: int | None = None):
  """Reference: fp32 logits and softmax, GQA via a group axis (K/V are never repeated); block_q None = XLA_BLOCK_Q."""
  block_q = block_q or XLA_BLOCK_Q
  b, t, h, d = q.shape
  s, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  kw = dict(s=s, scale=scale, bias=bias, window=window)
  if t <= block_q:
    out = _attend(qg, k, v, jnp.arange(t) + q_offset, jnp.arange(s), **kw)
    return out.reshape(b, t, h, dv).astype(q.dtype)

  n = -(-t // block_q)
  qg = jnp.pad(qg, ((0, 0), (0, n * block_q - t), (0, 0), (0, 0), (0, 0)))  # padded rows are sliced off
  q_blocks = jnp.moveaxis(qg.reshape(b, n, block_q, *qg.shape[2:]), 1, 0)
  span = block_q + window - 1
  if window and span < s:
    # Block i needs keys q_offset + i*block_q - (window-1) ... + block_q - 1: pad so every slice is in range.
    right = max(0, q_offset + n * block_q - s)
    pad = ((0, 0), (window - 1, right), (0, 0), (0, 0))
    k_src, v_src = jnp.pad(k, pad), jnp.pad(v, pad)
  else:
    span = 0

  @jax.checkpoint  # the backward recomputes each block's logits instead of storing [B, H, T, S]
  def block(i, q_blk):
    q_pos = q_offset + i * block_q + jnp.arange(block_q)
    if not span:
      return _attend(q_blk, k, v, q_pos, jnp.arange(s), **kw)
    start = q_offset + i * block_q  # in padded coordinates, = first needed key + window - 1
    k_blk = jax.lax.dynamic_slice_in_dim(k_src, start, span, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_src, start, span, axis=1)
    return _attend(q_blk, k_blk, v_blk, q_pos, start - (window - 1) + jnp.arange(span), **kw)

  out = jax.lax.map(lambda args: block(*args), (jnp.arange(n), q_blocks))  # [n, B, block_q, K, G, Dv]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * block_q, h, dv)[:, :t]
  return out.astype(q.dtype)


def _pad_last(x, d: int):
  return x if x.shape[-1] == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def cudnn_attention(q, k, v, *, scale: float, window: int = 0):
  """cuDNN flash attention; unequal qk / v head dims are zero-padded (zeros add nothing to q.k, and the padded
  output columns are sliced off)."""
  dv = v.shape[-1]
  d = max(q.shape[-1], dv)
  q, k, v = _pad_last(q, d), _pad_last(k, d), _pad_last(v, d)
  kw = dict(local_window_size=(window - 1, 0)) if window else {}  # cuDNN: keys in (i - window, i]
  call = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,  # noqa: E731
                                                       implementation="cudnn", **kw)
  return remat.keep_residuals(call)(q, k, v)[..., :dv]


def _compute_capability() -> tuple[int, ...] | None:
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return tuple(int(x) for x in str(cc).split(".")) if cc else None


def cudnn_supports(q, k, v, bias, q_offset: int = 0) -> str | None:
  """None if cuDNN can run this call, else the reason it cannot.

  The limits are those jax 0.11 checks (jax/_src/cudnn/fused_attention_stablehlo.py, check_is_flash_attention
  and check_layout; jax.nn.dot_product_attention wants q, k, v of one head dim, so we pad to the larger one):
  bf16/fp16, head dim a multiple of 8 and at most 256 on Hopper or newer (compute capability >= 9.0), 128 before.
  """
  if jax.default_backend() != "gpu":
    return f"platform is {jax.default_backend()}, not gpu"
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (cuDNN flash attention needs bf16 or fp16 throughout)"
  if bias is not None:
    return "a logit bias (cuDNN would need a dense [B,H,T,S] tensor)"
  if q_offset or q.shape[1] != k.shape[1]:
    return f"{q.shape[1]} queries at offset {q_offset} over {k.shape[1]} keys (causal cuDNN path is self-attention)"
  cc = _compute_capability()
  if cc is None:
    return "no CUDA compute capability (cuDNN needs an NVIDIA GPU)"
  d = max(q.shape[-1], v.shape[-1])
  d_max = 256 if cc >= (9, 0) else 128
  if d % 8 or d > d_max:
    return f"head dim {d} (cuDNN on compute capability {'.'.join(map(str, cc))} needs a multiple of 8, <= {d_max})"
  return None


PALLAS_MIN_DIM = 16  # Triton's tensor-core dot needs each power-of-two head-dim chunk to be >= 16


@dataclasses.dataclass(frozen=True)
class PallasBlocks:
  """Tile sizes of the flash kernel (config attention.pallas.*); block_q counts (query, group head) rows."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def from_config(cls, cfg) -> PallasBlocks:
    p = cfg.attention.get("pallas") if hasattr(cfg, "attention") else None
    return cls(**{f: int(p[f]) for f in ("block_q", "block_k", "num_warps", "num_stages")}) if p else cls()


def pallas_supports(q, k, v, bias) -> str | None:
  """None if the flash kernel can run this call on this platform, else the reason it cannot."""
  backend = jax.default_backend()
  if bias is not None and not hasattr(bias, "kernel_terms"):
    return f"bias {type(bias).__name__} has no kernel_terms() for the flash kernel"
  if backend == "gpu":
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
      if d % PALLAS_MIN_DIM:
        return f"{name} head dim {d} (the Triton kernel needs a multiple of {PALLAS_MIN_DIM})"
  return None


def pallas_attention(q, k, v, *, scale: float, bias=None, window: int = 0, q_offset: int = 0,
                     blocks: PallasBlocks | None = None):
  """The Pallas flash kernel (kernels/flash); biases go in as their kernel_terms(), never dense."""
  from efficientllm_jax.kernels.flash import flash_attention  # noqa: PLC0415  (keeps pallas off the import path)
  kind, thresholds, coef_nh = bias.kernel_terms() if bias is not None else (None, (), None)
  kw = dict(scale=scale, window=window, q_offset=q_offset, bias_kind=kind, bias_thresholds=thresholds,
            **dataclasses.asdict(blocks or PallasBlocks()))
  if coef_nh is None:
    kernel = functools.partial(flash_attention, bias_coef_nh=None, **kw)
    return remat.keep_residuals(lambda q, k, v: per_shard(kernel, q, k, v))(q, k, v)

  def kernel_with_bias(q, k, v, c):
    return flash_attention(q, k, v, bias_coef_nh=c, **kw)
  layouts = ("bthd", "bskd", "bskd", "nh")  # the bias coefficients [N, H]: split with the query heads
  return remat.keep_residuals(lambda *a: per_shard(kernel_with_bias, *a, layouts=layouts))(q, k, v, coef_nh)


def mosaic_supports(q, k, v, bias, window: int = 0) -> str | None:
  """None if the Mosaic GPU kernels can run this call here (a Hopper GPU, or CPU in interpret mode), else why."""
  from efficientllm_jax.kernels.flash import mosaic  # noqa: PLC0415  (keeps pallas off the import path)
  backend = jax.default_backend()
  if backend == "gpu" and ((cc := _compute_capability()) or (0,))[0] != 9:
    return f"compute capability {cc} (the Mosaic GPU kernels use Hopper's wgmma: 9.0)"
  if backend not in ("gpu", "cpu"):
    return f"platform is {backend} (the Mosaic GPU kernels run on a Hopper GPU, or interpreted on CPU)"
  return mosaic.unsupported(q, k, v, window=window, bias=bias)


# auto takes the Mosaic GPU kernels up to this sequence length per head dim: where their forward+backward was
# measured at least as fast as cuDNN's (benchmarks/RESULTS.md, session 9, H200, causal GQA 12/2, 14/2, 16/2:
# d 64 1.05-1.54x at 2K, 8K and 32K; d 128 1.01-1.20x at 2K and 8K, 0.92-0.93x at 32K).
MOSAIC_AUTO_MAX_SEQ = {64: 32768, 128: 8192}
# ... and only when their dk / dv kernel has at least this many CTAs per device (batch x K/V heads x key blocks of
# 128): one per key block, the first doing all the causal work and the last almost none, so with fewer CTAs than
# about two per SM the step waits on the longest ones. Measured (H200, 132 SMs, session 11, the unrolled 0.5B step,
# d 64, 14/2 heads, 8K, interleaved): 128 CTAs (micro-batch 1) cuDNN 11 % faster (86.0 against 96.3 ms; the dk / dv
# kernel 31.4 ms against cuDNN's backward 19.4); 256 (micro-batch 2) Mosaic 3 % faster (151.0 against 155.7 ms).
MOSAIC_AUTO_MIN_DKV_CTAS = 256


def mosaic_dkv_ctas(q, k) -> int:
  """CTAs of the Mosaic dk / dv kernel on one device: its batch and K/V heads as per_shard splits them, times its
  key blocks (two warpgroups of mosaic.ROWS keys each)."""
  from efficientllm_jax.kernels.flash import mosaic  # noqa: PLC0415
  mesh, batch, heads = _split_axes((q, k), ("bthd", "bskd"))
  split = lambda axes: math.prod(mesh.shape[a] for a in axes) if axes else 1  # noqa: E731
  return (k.shape[0] // split(batch)) * (k.shape[2] // split(heads)) * (k.shape[1] // (2 * mosaic.ROWS))


def mosaic_auto(q, k, v, bias, window: int = 0) -> bool:
  """Whether auto takes the Mosaic GPU kernels for this call (a Hopper GPU, one device, a shape they take and won
  on)."""
  if jax.default_backend() != "gpu" or q.shape[1] > MOSAIC_AUTO_MAX_SEQ.get(q.shape[-1], 0):
    return False
  if sh.active_devices() > 1:
    _log_once("attention: auto takes cuDNN on a mesh of several devices: the Mosaic GPU kernels run per device "
              "there (ops.per_shard), a path not yet run on GPUs (tests/test_gpu_mesh.py, benchmarks/"
              "gpu_acceptance.sh mesh2); attention.impl=mosaic takes them")
    return False
  if (ctas := mosaic_dkv_ctas(q, k)) < MOSAIC_AUTO_MIN_DKV_CTAS:
    _log_once(f"attention: auto takes cuDNN, not the Mosaic GPU kernels: their dk / dv kernel would launch "
              f"{ctas} CTAs a device, below ops.MOSAIC_AUTO_MIN_DKV_CTAS="
              f"{MOSAIC_AUTO_MIN_DKV_CTAS} (a larger micro-batch fills the GPU)")
    return False
  return mosaic_supports(q, k, v, bias, window) is None


def mosaic_blocks(head_dim: int, seq_len: int = 0):
  """The measured-best Mosaic blocks per head dim (benchmarks/RESULTS.md, sessions 7, 8 and 12, H200, 8K causal): at
  d 64 dq fused into the dk / dv kernel over 128-row query blocks, each warpgroup forming the dq of its own 64
  rows, dS^T formed before dv's product (0.97x cuDNN, against 0.90-0.93x with 64-row blocks, where the warpgroups
  take turns at dq), and, where `seq_len` is a multiple of 256, a forward over 256-key blocks in 3 slots (session
  12: 1.331 against 1.356 ms at B 4, 14/2 heads; 256 keys in 2 slots was the slower, 1.398); at d 128 the
  separate dq kernel with the overlap (0.84-0.89x, against 0.79-0.81x fused, whose dk / dv kernel spills
  registers). Both launch their CTAs longest first (`heavy_first`, session 9: 1.15x and 1.10x cuDNN)."""
  from efficientllm_jax.kernels.flash import mosaic  # noqa: PLC0415
  if head_dim == 64:
    wide = dict(fwd_k=256, fwd_stages=3) if seq_len and seq_len % 256 == 0 else {}
    return mosaic.MosaicBlocks(fused_dq=True, dkv_q=128, overlap=False, **wide)
  return mosaic.MosaicBlocks()


def mosaic_attention(q, k, v, *, scale: float):
  from efficientllm_jax.kernels.flash import mosaic  # noqa: PLC0415
  params = mosaic.MosaicParams(scale=scale, causal=True, blocks=mosaic_blocks(q.shape[-1], q.shape[1]),
                               interpret=jax.default_backend() == "cpu")
  # per_shard inside keep_residuals: the residuals are named outside the shard_map, where the remat policy sees them
  return remat.keep_residuals(lambda q, k, v: per_shard(functools.partial(mosaic.mosaic_attention, params=params),
                                                        q, k, v))(q, k, v)


def _split_axes(args, layouts):
  """(mesh, batch axes, head axes) per_shard splits `args` over: the batch over the data-like axes, the heads over
  the tensor axes when every head count divides; (None, (), ()) with no active mesh."""
  ctx = sh.active_mesh()
  if ctx is None:
    return None, (), ()
  mesh, rules = ctx

  def dims(letters):  # the sizes of every argument's dims named by `letters`
    return [n for x, lay in zip(args, layouts) for c, n in zip(lay, x.shape) if c in letters]
  _, batch = sh.batch_axes()
  if any(n % math.prod(mesh.shape[a] for a in batch) for n in dims("b")):
    batch = ()
  heads = tuple(a for a in sh.mesh_axes(rules.get("act_heads")) if mesh.shape[a] > 1 and a not in batch)
  if any(n % math.prod(mesh.shape[a] for a in heads) for n in dims("hk")):
    heads = ()  # e.g. MQA's one K/V head under tensor=2: the heads stay whole (GQA groups must not be cut)
  return mesh, batch, heads


def per_shard(fn, *args, layouts: tuple[str, ...] = ("bthd", "bskd", "bskd"), out_layouts="bthd"):
  """fn(*args) on each device's share of the batch (and of the heads, under tensor parallelism, when every head
  count divides): a Pallas kernel is a custom call XLA cannot partition, so on a mesh it would otherwise gather
  the whole arrays onto every device. `layouts` name each argument's dims, `out_layouts` each output's (a string,
  or a tuple of them for a tuple of outputs): "b" the batch, "h" query heads, "k" K/V heads, any other letter a dim
  that stays whole (e.g. "nh" for per-head coefficients without a batch dim). No active mesh, or nothing split:
  fn(*args)."""
  mesh, batch, heads = _split_axes(args, layouts)
  if not batch and not heads:
    return fn(*args)
  axes = {"b": batch or None, "h": heads or None, "k": heads or None}
  spec = lambda lay: jax.sharding.PartitionSpec(*(axes.get(c) for c in lay))  # noqa: E731
  out_specs = spec(out_layouts) if isinstance(out_layouts, str) else tuple(spec(o) for o in out_layouts)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(lay) for lay in layouts), out_specs=out_specs,
                       check_vma=False)(*args)


def attention(q, k, v, *, impl: str = "auto", scale: float | None = None, bias=None, window: int = 0,
              block_q: int | None = None, pallas: PallasBlocks | None = None):
  """Causal self-attention over [B, T, H, D] queries; returns [B, T, H, Dv] in q's dtype."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  backend = jax.default_backend()
  # auto takes the flash kernel on TPU, and on GPU for a bias measured faster there (ALiBi 1.5B/8K: 0.57 s/step
  # against 2.8 s on the xla fallback, benchmarks/RESULTS.md; cuDNN never takes a bias).
  auto_pallas = backend == "tpu" or (backend == "gpu" and getattr(bias, "pallas_on_gpu", False))
  if impl == "pallas" or (impl == "auto" and auto_pallas):
    reason = pallas_supports(q, k, v, bias)
    if reason is None:
      return pallas_attention(q, k, v, scale=scale, bias=bias, window=window, blocks=pallas)
    if impl == "pallas":
      raise ConfigError(f"attention.impl='pallas' cannot run this call: {reason}; use attention.impl=auto or xla")
    _log_once(f"attention: xla path ({reason})", logging.WARNING)
    return xla_attention(q, k, v, scale=scale, bias=bias, window=window, block_q=block_q)
  if impl == "mosaic":
    reason = mosaic_supports(q, k, v, bias, window)
    if reason is not None:
      raise ConfigError(f"attention.impl='mosaic' cannot run this call: {reason}; use attention.impl=auto")
    if backend == "cpu":
      _log_once("attention.impl=mosaic on CPU: the Mosaic GPU kernels run in Pallas' GPU interpret mode (slow, "
                "meant for tests)", logging.WARNING)
    return mosaic_attention(q, k, v, scale=scale)
  if impl == "auto" and mosaic_auto(q, k, v, bias, window):
    _log_once(f"attention: auto takes the Mosaic GPU kernels (head dim {q.shape[-1]}, T {q.shape[1]}; measured "
              "faster than cuDNN there, ops.MOSAIC_AUTO_MAX_SEQ and MOSAIC_AUTO_MIN_DKV_CTAS)")
    return mosaic_attention(q, k, v, scale=scale)
  if impl in ("auto", "cudnn"):
    reason = cudnn_supports(q, k, v, bias)
    if reason is None:
      return cudnn_attention(q, k, v, scale=scale, window=window)
    if impl == "cudnn":
      raise ConfigError(f"attention.impl='cudnn' cannot run this call: {reason}; use attention.impl=auto or xla")
    _log_once(f"attention: xla path ({reason})", logging.WARNING if backend == "gpu" else logging.INFO)
  return xla_attention(q, k, v, scale=scale, bias=bias, window=window, block_q=block_q)
