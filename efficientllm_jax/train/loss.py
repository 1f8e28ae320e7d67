"""Fused, chunked cross-entropy over the tied LM head: no [tokens, vocab] fp32 logits at once, no recompute.

Tokens are processed in chunks along the sequence (the batch dimension stays whole, so a batch sharded over the
data axes stays sharded). Under differentiation the forward pass of each chunk also forms the gradient: dlogits =
softmax - onehot (fp32), cast to the compute dtype, then dh = dlogits @ W and dW += dlogits^T @ h with fp32
accumulation. The table comes in as stored (fp32) and is cast inside, so its gradient, the fp32 sum over chunks,
goes back to the parameter as it is (before session 12 it was rounded to the compute dtype first: one bf16
rounding of a 32K-token sum and an extra pass over the [vocab, hidden] table). So the LM head costs three
matmuls, all in the compute dtype, where autodiff of a rematerialised chunk costs four (the logits twice) and
runs the two gradient matmuls on fp32 dlogits (TF32 GEMMs on a GPU, measured at 67 ms of a 449 ms Qwen2.5-0.5B
step on an H200). Peak logits memory is one chunk: batch x chunk x vocab x 4 B.

The log-sum-exp is one pass over the logits (`logsumexp_one_pass`: a running (max, sum of exp) pair per row, a
variadic reduction), where `jax.nn.logsumexp` reads them twice (max, then sum). At 151,936 classes the logits
dominate the loss's memory traffic: per chunk they are written once, read for the log-sum-exp, read again for the
gradient. `impl="pallas"` (`train.loss_impl`) hands each chunk's logits to one Pallas kernel (kernels/xent) that
forms the log-sum-exp (one exponential an element), the target logit and dlogits in two streams over the row,
where XLA's one-pass reduction is bound by its two exponentials an element on bf16 logits (on an H200 the kernel
made the 0.5B step 1.3 % faster: benchmarks/RESULTS.md, session 11; `auto`, the default, takes it on one NVIDIA
GPU). `logits_dtype` picks the dtype the LM-head matmul writes them in: float32 (default) or bfloat16 (half the
traffic, and what the transformers peer does; the softmax arithmetic stays fp32 either way).

With an active mesh (parallel/sharding.activation_sharding) the loss runs under `shard_map` over the mesh axes
the batch dimension is split over: each device takes its own rows and the whole table (gathered once, not once
per chunk, in the compute dtype, so there the table's gradient still comes back in that dtype), and the table's
gradient is summed over devices once, after the chunk loop. Left to GSPMD, the reshape into chunks lost the batch
sharding: every device computed every row's logits (data parallel) or all-reduced fp32 partial logits per chunk
(FSDP; 673 ms of a 1.28 s 0.5B fsdp4 step).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from efficientllm_jax.config import LOGITS_DTYPES, LOSS_IMPLS
from efficientllm_jax.kernels.xent import softmax_xent
from efficientllm_jax.parallel import sharding as sh


_FLOOR = float(jnp.finfo(jnp.float32).min)  # the running max's start: finite, so exp(start - start) is 1, not NaN


def _max_sumexp(a, b):
  """Combines two (max, sum of exp(x - max)) pairs."""
  (ma, sa), (mb, sb) = a, b
  m = jnp.maximum(ma, mb)
  return m, sa * jnp.exp(ma - m) + sb * jnp.exp(mb - m)


def logsumexp_one_pass(x, axis: int = -1):
  """log(sum(exp(x))) over `axis` in fp32, reading x once (online softmax's running max and rescaled sum).

  Not differentiable (a general reducer); the loss forms its gradient itself. Rows of -inf give -inf, as
  jax.nn.logsumexp does; NaN propagates."""
  x = x.astype(jnp.float32)
  axis = axis % x.ndim
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(_FLOOR), jnp.float32(0)), _max_sumexp, (axis,))
  return m + jnp.log(s)


def _logits(h_bcd, w_vd, dtype):
  return jnp.einsum("bcd,vd->bcv", h_bcd, w_vd, preferred_element_type=dtype)


def _lse_target(logits, y):
  """The log-sum-exp and the target's logit of each row, fp32."""
  tgt = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return logsumexp_one_pass(logits), tgt


def xla_rows(logits, y, m, out_dtype):
  """(log-sum-exp, target logit, dlogits = (softmax - onehot) * m in out_dtype) of logits [..., V] in XLA: the
  training pass of impl="xla", and what kernels/xent.softmax_xent computes in one kernel for impl="pallas"."""
  lse, tgt = _lse_target(logits, y)
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)
  d = (jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - onehot) * m[..., None]
  return lse, tgt, d.astype(out_dtype)


def _chunk_loss(h_bcd, w_vd, y_bc, m_bc, dtype):
  lse, tgt = _lse_target(_logits(h_bcd, w_vd, dtype), y_bc)
  return jnp.sum((lse - tgt) * m_bc)


def _zeros(shape, row_axes: tuple[str, ...]):
  """fp32 zeros for a scan carry that sums over rows: under shard_map they must vary over the rows' mesh axes
  as the body's sums do (a carry keeps its type)."""
  z = jnp.zeros(shape, jnp.float32)
  return jax.lax.pcast(z, row_axes, to="varying") if row_axes else z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_sum(row_axes, dtype, impl, h_kbcd, w_vd, y_kbc, m_kbc):
  """Sum of masked token losses over chunks k (primal: no gradient work). `row_axes`: the shard_map mesh axes the
  rows are split over (() outside shard_map); `dtype`: the logits' dtype; `impl`: "xla" or "pallas" (the forward
  with gradients takes the kernel; this primal-only sum, as in eval, stays in XLA)."""
  w_vd = w_vd.astype(h_kbcd.dtype)
  body = lambda total, xs: (total + _chunk_loss(xs[0], w_vd, xs[1], xs[2], dtype), None)  # noqa: E731
  return jax.lax.scan(body, _zeros((), row_axes), (h_kbcd, y_kbc, m_kbc))[0]


def _chunked_sum_fwd(row_axes, dtype, impl, h_kbcd, w_in, y_kbc, m_kbc):
  w_vd = w_in.astype(h_kbcd.dtype)  # the compute-dtype table (a no-op when the caller passed it cast)

  def body(carry, xs):
    total, dw_vd = carry
    h_bcd, y_bc, m_bc = xs
    logits = _logits(h_bcd, w_vd, dtype)
    if impl == "pallas":  # kernels/xent takes rows [R, V]
      b, c, v = logits.shape
      lse, tgt, dlogits = softmax_xent(logits.reshape(b * c, v), y_bc.reshape(-1), m_bc.reshape(-1),
                                       out_dtype=h_bcd.dtype)
      lse, tgt, dlogits = lse.reshape(b, c), tgt.reshape(b, c), dlogits.reshape(b, c, v)
    else:
      lse, tgt, dlogits = xla_rows(logits, y_bc, m_bc, h_bcd.dtype)
    loss = jnp.sum((lse - tgt) * m_bc)
    dh_bcd = jnp.einsum("bcv,vd->bcd", dlogits, w_vd, preferred_element_type=jnp.float32).astype(h_bcd.dtype)
    dw_vd = dw_vd + jnp.einsum("bcv,bcd->vd", dlogits, h_bcd, preferred_element_type=jnp.float32)
    return (total + loss, dw_vd), dh_bcd

  init = (_zeros((), row_axes), _zeros(w_vd.shape, row_axes))
  (total, dw_vd), dh_kbcd = jax.lax.scan(body, init, (h_kbcd, y_kbc, m_kbc))
  return total, (dh_kbcd, dw_vd.astype(w_in.dtype))  # fp32 for an fp32 table: its sum is never rounded


def _chunked_sum_bwd(row_axes, dtype, impl, res, g):
  dh_kbcd, dw_vd = res
  dw_vd = dw_vd * g.astype(dw_vd.dtype)
  if row_axes:  # under shard_map the table is the same on every device: its gradient sums the devices' rows, once
    dw_vd = jax.lax.psum(dw_vd, row_axes)
  return (dh_kbcd * g.astype(dh_kbcd.dtype), dw_vd, None, None)


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd)


def _local_sum(h_btd, w_vd, targets_bt, mask_bt, chunk: int, dtype, impl: str, row_axes: tuple[str, ...] = ()):
  """Sum of token losses over this device's rows, chunks of `chunk` tokens (ceil(chunk / rows) positions)."""
  b, t, d = h_btd.shape
  c = t if not chunk else max(1, min(t, math.ceil(chunk / b)))
  pad = (-t) % c
  if pad:  # padded positions carry mask 0
    h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
  k = h_btd.shape[1] // c
  split = lambda x: jnp.moveaxis(x.reshape(b, k, c, *x.shape[2:]), 1, 0)  # noqa: E731 - [B, T, ...] -> [k, B, c, ...]
  return _chunked_sum(row_axes, dtype, impl, split(h_btd), w_vd, split(targets_bt), split(mask_bt))


def resolve_impl(impl: str) -> str:
  """train.loss_impl as run: "auto" is "pallas" on one NVIDIA GPU (the Triton kernel) and "xla" elsewhere: on a
  CPU or TPU the kernel would run in Pallas' interpreter, and on a mesh of several GPUs (the kernel per device
  under the loss's shard_map) it has not been measured yet."""
  if impl not in LOSS_IMPLS:
    raise ValueError(f"train.loss_impl={impl!r} is not one of {LOSS_IMPLS}")
  if impl != "auto":
    return impl
  dev = jax.devices()[0]
  one_device = sh.active_devices() == 1
  impl = "pallas" if dev.platform == "gpu" and getattr(dev, "compute_capability", None) and one_device else "xla"
  _log_choice(impl, dev.platform, one_device)
  return impl


@functools.cache
def _log_choice(impl: str, platform: str, one_device: bool) -> None:
  why = {"pallas": "the Triton kernel, kernels/xent", "xla": "XLA" + ("" if one_device else ": several devices")}
  logging.info("loss: train.loss_impl=auto takes %s (%s)", impl, f"{why[impl]}, platform {platform}")


def cross_entropy(h_btd, embed_vd, targets_bt, mask_bt=None, *, chunk: int = 0, logits_dtype: str = "float32",
                  impl: str = "auto"):
  """Returns (sum of token losses, number of tokens counted), both fp32 scalars. `chunk` = tokens per chunk
  (over the whole batch; 0 = one chunk); `logits_dtype`: the LM-head matmul's output dtype, "float32" or
  "bfloat16"; `impl`: "auto", "xla" or "pallas" (kernels/xent for the training pass; `resolve_impl`) (see the
  module docstring)."""
  if logits_dtype not in LOGITS_DTYPES:
    raise ValueError(f"train.logits_dtype={logits_dtype!r} is not one of {LOGITS_DTYPES}")
  impl = resolve_impl(impl)
  dtype = jnp.dtype(logits_dtype)
  mask_bt = jnp.ones(targets_bt.shape, jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
  count = jnp.sum(mask_bt)
  mesh, axes = sh.batch_axes()
  if mesh is None:  # the table as stored (fp32): cast inside, its gradient summed and returned in fp32
    return _local_sum(h_btd, embed_vd, targets_bt, mask_bt, chunk, dtype, impl), count
  w_vd = embed_vd.astype(h_btd.dtype)  # gathered to every device in the compute dtype
  rows = math.prod(mesh.shape[a] for a in axes)
  per_device_chunk = max(1, chunk // rows) if chunk else 0

  def local(h, w, y, m):
    return jax.lax.psum(_local_sum(h, w, y, m, per_device_chunk, dtype, impl, axes), axes)

  rows_spec = P(axes)
  total = jax.shard_map(local, mesh=mesh, in_specs=(rows_spec, P(), rows_spec, rows_spec), out_specs=P())(
      h_btd, w_vd, targets_bt, mask_bt)
  return total, count
