"""Building blocks whose parameters carry logical axis names: RMSNorm, projections, embedding, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficientllm_jax.parallel.sharding import shard

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
  return DTYPES[name]


def normal_init(std: float, names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), names)


def zeros_init(names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), names)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in fp32 (as Qwen2 does), scale cast back to the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.bfloat16, param_dtype=jnp.float32, name: str = "embed"):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), sharding_names=(name,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _promote_keep_bias(args, /, *, dtype=None, inexact=True):
  """nnx.LinearGeneral's dtype promotion for (inputs, kernel, bias), with the bias kept in fp32."""
  inputs, kernel, bias = args
  inputs, kernel = nnx.nn.dtypes.promote_dtype((inputs, kernel), dtype=dtype, inexact=inexact)
  return inputs, kernel, None if bias is None else bias.astype(jnp.float32)


class Dense(nnx.LinearGeneral):
  """nnx.LinearGeneral whose bias is added in fp32 to the matmul's output, rounded to the compute dtype once.

  So the bias gradient, a sum over every token of the step, accumulates in fp32. With the bias cast to bf16 before
  the add, autodiff summed it in bf16: the optimised HLO of a Qwen2.5-0.5B step on an H200 reduced the q/k/v bias
  gradients over 32K tokens with a bf16 adder."""

  def __call__(self, inputs, out_sharding=None):
    return super().__call__(inputs, out_sharding).astype(self.dtype)


def dense(in_features, out_features, names, *, cfg, rngs, use_bias=False, axis=-1):
  """Dense (nnx.LinearGeneral, bias added in fp32) with the model's dtypes, N(0, init_std) kernel and logical axis
  `names`."""
  out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
  nout = len(out)
  return Dense(
      in_features, out, axis=axis, use_bias=use_bias,
      dtype=dtype(cfg.model.dtype), param_dtype=dtype(cfg.model.param_dtype),
      kernel_init=normal_init(cfg.model.init_std, names),
      bias_init=zeros_init(names[-nout:]), promote_dtype=_promote_keep_bias,
      rngs=rngs)


class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` is the tied LM head."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m = cfg.model
    init = normal_init(m.init_std, ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (m.vocab_size, m.hidden), dtype(m.param_dtype)))
    self.dtype = dtype(m.dtype)

  def __call__(self, tokens_bt):
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)

  def attend(self, h_btd):
    return jnp.einsum("btd,vd->btv", h_btd, self.embedding[...].astype(self.dtype))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases (Qwen2.5 MLP). Returns (y, aux) like every FFN kind."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, width: int | None = None):
    d, f = cfg.model.hidden, width or cfg.model.ffn_dim
    self.gate = dense(d, f, ("embed", "mlp"), cfg=cfg, rngs=rngs)
    self.up = dense(d, f, ("embed", "mlp"), cfg=cfg, rngs=rngs)
    self.down = dense(f, d, ("mlp", "embed"), cfg=cfg, rngs=rngs)

  def __call__(self, x_btd):
    h_btf = shard(jax.nn.silu(self.gate(x_btd)) * self.up(x_btd), ("batch", "length", "act_mlp"))
    return self.down(h_btf), {}
