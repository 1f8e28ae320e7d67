"""Position schemes behind one factory, `make_position(cfg, rngs)`; `position.kind` picks one.

Every scheme is an nnx.Module with two hooks the decoder calls:
  embed(x_btd, positions_bt) -> x_btd      additive absolute schemes act here (identity otherwise)
  context(positions_bt)      -> PositionContext, computed once per forward and broadcast to every layer
and attention applies the context: `rotate(x, ctx)` for RoPE and passes `ctx.bias` to ops.attention.

  kind        where            what
  rope        q, k rotation    Su et al.; base position.rope_theta over position.rope_fraction of head_dim
  sinusoidal  embeddings       Vaswani et al. fixed sin/cos table; token embeddings x sqrt(hidden) (their 3.4)
  learned     embeddings       learned table of position.max_len rows (GPT-2 / BERT style)
  relative    logit bias       T5: one learned scalar per (bucket, head), causal log-spaced buckets
  alibi       logit bias       Press et al.: -m_h (i - j) with the paper's head slopes
  none        nothing          NoPE: causal masking is the only order signal

Logit-bias schemes hand attention a small pytree (the T5 table [buckets, H], or the ALiBi slopes [H], plus
static ints) with `dense(q_pos_t, k_pos_s) -> [H, t, s]` fp32, so the kernel evaluates it per tile / query chunk
and no [H, T, T] tensor is ever stored. The kernel supplies the positions (query offset + arange), so bias
schemes assume contiguous positions 0..T-1 (what the decoder passes when positions_bt is None).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from efficientllm_jax.models.layers import dtype, normal_init

SINUSOID_BASE = 10000.0  # Vaswani et al.


@struct.dataclass
class PositionContext:
  """Per-forward position data broadcast to all layers (a pytree: scan-friendly)."""
  cos: Any = None  # [B, T, rot/2] fp32, RoPE only
  sin: Any = None
  bias: Any = None  # logit-bias object with dense(q_pos, k_pos) -> [H, t, s] (relative / alibi), or None


# ----------------------------------------------------------------------------------------------------- RoPE


def rope_tables(positions_bt, rot_dim: int, theta: float):
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
  ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
  return jnp.cos(ang), jnp.sin(ang)


def rotate(x_bthd, ctx: PositionContext):
  """Rotate the first `2 * cos.shape[-1]` dims of each head (half-split layout, as Qwen2/HF), rest untouched."""
  if ctx.cos is None:
    return x_bthd
  half = ctx.cos.shape[-1]
  rot, rest = x_bthd[..., : 2 * half], x_bthd[..., 2 * half:]
  x1, x2 = rot[..., :half].astype(jnp.float32), rot[..., half:].astype(jnp.float32)
  cos, sin = ctx.cos[:, :, None, :], ctx.sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthd.dtype)
  return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class NoPosition(nnx.Module):
  """NoPE: no positional signal at all; causal masking is the only order information."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    del cfg, rngs

  def embed(self, x_btd, positions_bt):
    return x_btd

  def context(self, positions_bt) -> PositionContext:
    return PositionContext()


class RoPE(NoPosition):
  """Rotary embedding (Su et al.) with base `position.rope_theta` over `position.rope_fraction` of head_dim."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, rot_dim: int | None = None):
    super().__init__(cfg, rngs=rngs)
    self.rot_dim = rot_dim or int(round(cfg.model.head_dim * cfg.position.rope_fraction))
    self.theta = cfg.position.rope_theta

  def context(self, positions_bt) -> PositionContext:
    cos, sin = rope_tables(positions_bt, self.rot_dim, self.theta)
    return PositionContext(cos=cos, sin=sin)


# ------------------------------------------------------------------------------------------ absolute embeddings


def sinusoid_table(positions_bt, dim: int, base: float = SINUSOID_BASE):
  """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)); fp32 [B, T, dim]."""
  inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
  ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  return jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(*positions_bt.shape, dim)  # interleave


class Sinusoidal(NoPosition):
  """Fixed sinusoidal absolute encoding added to the token embeddings (no parameters).

  As in Vaswani et al. (3.4) the token embeddings are multiplied by sqrt(hidden) first: the sinusoids have unit
  amplitude while the (tied, std `model.init_std`) token embeddings are ~0.02, so unscaled they would be swamped.
  The tied LM head reads the unscaled table.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.dim = cfg.model.hidden
    self.scale = math.sqrt(cfg.model.hidden)

  def embed(self, x_btd, positions_bt):
    pe_btd = sinusoid_table(positions_bt, self.dim)
    return (x_btd.astype(jnp.float32) * self.scale + pe_btd).astype(x_btd.dtype)


class Learned(NoPosition):
  """Learned absolute table [position.max_len, hidden] added to the token embeddings (GPT-2 style).

  validate() rejects data.seq_len > position.max_len; a position past the table reads NaN (never wraps).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    m = cfg.model
    init = normal_init(m.init_std, (None, "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (cfg.position.max_len, m.hidden), dtype(m.param_dtype)))

  def embed(self, x_btd, positions_bt):
    pe_btd = jnp.take(self.embedding[...], positions_bt, axis=0, mode="fill", fill_value=jnp.nan)
    return x_btd + pe_btd.astype(x_btd.dtype)


# ------------------------------------------------------------------------------------------------- logit biases


@functools.lru_cache(maxsize=None)
def t5_bucket_lut(num_buckets: int, max_distance: int) -> tuple[int, ...]:
  """Bucket of each causal distance n = 0..max_distance (T5, unidirectional); every n >= max_distance maps to
  the last entry. Evaluated once in float64, so the [t, s] grid needs one integer gather, not a log per entry:
    n < nb/2:  n;    else  min(nb/2 + floor(log(n / (nb/2)) / log(max_distance / (nb/2)) * (nb - nb/2)), nb - 1)
  """
  exact = num_buckets // 2
  out = []
  for n in range(max_distance + 1):
    if n < exact:
      out.append(n)
    else:
      large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
      out.append(min(large, num_buckets - 1))
  return tuple(out)


def t5_buckets(q_pos_t, k_pos_s, num_buckets: int, max_distance: int):
  """[t, s] int32 bucket of each (query, key) pair; keys after the query fall in bucket 0 (they are masked)."""
  n_ts = jnp.clip(q_pos_t[:, None] - k_pos_s[None, :], 0, max_distance)
  return jnp.asarray(t5_bucket_lut(num_buckets, max_distance), jnp.int32)[n_ts]


@struct.dataclass
class T5Bias:
  """T5 relative bias: logits[h, i, j] += table[bucket(i - j), h]."""
  table_nh: jax.Array  # [num_buckets, H]
  num_buckets: int = struct.field(pytree_node=False)
  max_distance: int = struct.field(pytree_node=False)
  # attention.impl=auto sends it to the flash kernel on GPU: 1.5B relative-position training on an H200 ran
  # 35,080 tok/s through the kernel against 2,974 through xla (benchmarks/RESULTS.md).
  pallas_on_gpu = True

  def dense(self, q_pos_t, k_pos_s):
    bucket_ts = t5_buckets(q_pos_t, k_pos_s, self.num_buckets, self.max_distance)
    return jnp.moveaxis(self.table_nh.astype(jnp.float32)[bucket_ts], -1, 0)  # [H, t, s]

  def kernel_terms(self):
    """For the flash kernel's step bias: bias(d) = sum_n [d >= thr_n] * coef[n, h] with d = q_pos - k_pos.

    The bucket LUT is non-decreasing, so bucket(d) = (thresholds passed) - 1 with thr_n = min{d: bucket(d) >= n}
    (exact, no log in the kernel), and coef holds the table's per-bucket deltas (differentiable: its gradient maps
    back to the table). Buckets past the LUT's last one never occur and get no coefficient.
    """
    lut = t5_bucket_lut(self.num_buckets, self.max_distance)
    last = lut[-1]
    thresholds = tuple(next(d for d, b in enumerate(lut) if b >= n) for n in range(last + 1))
    table = self.table_nh[: last + 1].astype(jnp.float32)
    coef_nh = jnp.concatenate([table[:1], table[1:] - table[:-1]], axis=0)
    return "step", thresholds, coef_nh


class Relative(NoPosition):
  """T5 relative position bias, causal bucketing; one table shared by every layer, as in T5 (Raffel et al.
  compute it in the first layer and reuse it in all others)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    p, m = cfg.position, cfg.model
    self.num_buckets, self.max_distance = int(p.num_buckets), int(p.max_distance)
    init = normal_init(m.init_std, (None, "heads"))
    self.table = nnx.Param(init(rngs.params(), (self.num_buckets, m.num_heads), dtype(m.param_dtype)))

  def context(self, positions_bt) -> PositionContext:
    return PositionContext(bias=T5Bias(self.table[...], self.num_buckets, self.max_distance))


def alibi_slopes(num_heads: int) -> list[float]:
  """Press et al.: for n a power of two, 2^(-8h/n), h = 1..n; otherwise the slopes of the nearest lower power of
  two p, then every other slope of 2p (its 1st, 3rd, 5th, ...) until there are n."""
  def power_of_two(n):
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
  p = 2 ** int(math.floor(math.log2(num_heads)))
  if p == num_heads:
    return power_of_two(num_heads)
  return power_of_two(p) + alibi_slopes(2 * p)[0::2][: num_heads - p]


@struct.dataclass
class ALiBiBias:
  """logits[h, i, j] += -slope_h * (i - j)."""
  slopes_h: jax.Array  # [H]
  pallas_on_gpu = True  # attention.impl=auto sends it to the flash kernel on GPU (measured 4.9x faster than xla)

  def dense(self, q_pos_t, k_pos_s):
    dist_ts = (q_pos_t[:, None] - k_pos_s[None, :]).astype(jnp.float32)
    return -self.slopes_h.astype(jnp.float32)[:, None, None] * dist_ts

  def kernel_terms(self):
    """For the flash kernel's linear bias: bias(d) = coef[0, h] * d with d = q_pos - k_pos."""
    return "linear", (), -self.slopes_h.astype(jnp.float32)[None, :]


class ALiBi(NoPosition):
  """Attention with linear biases: no embedding, a fixed per-head distance penalty on the logits."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.slopes = tuple(alibi_slopes(cfg.model.num_heads))  # static floats, not a parameter

  def context(self, positions_bt) -> PositionContext:
    return PositionContext(bias=ALiBiBias(jnp.asarray(self.slopes, jnp.float32)))


POSITIONS = {"rope": RoPE, "sinusoidal": Sinusoidal, "learned": Learned, "relative": Relative, "alibi": ALiBi,
             "none": NoPosition}


def make_position(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The scheme for `position.kind`. With MLA, RoPE rotates only its decoupled dims (qk_rope_head_dim), so the
  context's cos/sin have qk_rope_head_dim / 2 columns and `rotate` on q_rope / k_rope rotates all of them."""
  if cfg.position.kind == "rope" and cfg.attention.kind == "mla":
    return RoPE(cfg, rngs=rngs, rot_dim=int(cfg.attention.mla.qk_rope_head_dim))
  return POSITIONS[cfg.position.kind](cfg, rngs=rngs)
