"""Position schemes behind one factory, `make_position(cfg, rngs)`.

Every scheme is an nnx.Module with three hooks the decoder and attention call:
  embed(x_btd, positions_bt) -> x_btd      additive absolute schemes act here (identity otherwise)
  context(positions_bt)      -> PositionContext, computed once per forward and broadcast to every layer
and attention applies the context: `rotate(x, ctx)` for RoPE and `ctx.bias` for logit-bias schemes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct


@struct.dataclass
class PositionContext:
  """Per-forward position data broadcast to all layers (a pytree: scan-friendly)."""
  cos: Any = None  # [B, T, rot/2] fp32, RoPE only
  sin: Any = None
  bias: Any = None  # logit-bias object with dense(q_pos, k_pos) -> [H, t, s] (relative / alibi), or None


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


POSITIONS = {"rope": RoPE, "none": NoPosition}


def make_position(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The scheme for `position.kind`. With MLA, RoPE rotates only its decoupled dims (qk_rope_head_dim), so the
  context's cos/sin have qk_rope_head_dim / 2 columns and `rotate` on q_rope / k_rope rotates all of them."""
  if cfg.position.kind == "rope" and cfg.attention.kind == "mla":
    return RoPE(cfg, rngs=rngs, rot_dim=int(cfg.attention.mla.qk_rope_head_dim))
  return POSITIONS[cfg.position.kind](cfg, rngs=rngs)
