"""Run by test_flash_mosaic.py in one subprocess with 4 simulated CPU devices (XLA_FLAGS set before jax starts).

`ops.per_shard` on meshes: the per-device shapes the wrapped function sees (batch over data / fsdp, heads over
tensor when both the query and the K/V heads divide, whole otherwise); values and gradients through it on a mesh
against no mesh; the Mosaic GPU kernels through it lowered for CUDA on a mesh. Prints one JSON line.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import ops
from efficientllm_jax.parallel import sharding as sh


def _mesh(**sizes):
  shape = tuple(sizes.get(a, 1) for a in sh.MESH_AXES)
  return jax.make_mesh(shape, sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=jax.devices()[:int(np.prod(shape))])


def seen_shapes(mesh, b, h, kvh):
  """The shapes of q and k inside per_shard's function on `mesh` for q [b, 128, h, 64], k [b, 128, kvh, 64]."""
  seen = []

  def fn(q, k, v):
    seen.append((tuple(q.shape), tuple(k.shape)))
    return q

  q = jax.ShapeDtypeStruct((b, 128, h, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, 128, kvh, 64), jnp.bfloat16)
  with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
    jax.eval_shape(lambda q, k, v: ops.per_shard(fn, q, k, v), q, k, k)
  return [list(map(list, s)) for s in seen]


def _inputs(b, t, h, kvh, d):
  ks = jax.random.split(jax.random.key(3), 4)
  q, do = (jax.random.normal(ks[i], (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for i in (0, 3))
  k, v = (jax.random.normal(ks[i], (b, t, kvh, d), jnp.float32).astype(jnp.bfloat16) for i in (1, 2))
  return q, k, v, do


def _grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def per_shard_values():
  """Max error, relative to the largest value, of out / dq / dk / dv of the xla path run through per_shard on a
  data=2 x tensor=2 mesh (GQA: each device holds 2 of the 4 query heads and the 1 of the 2 K/V heads they read)
  against the same path with no mesh; and the output's sharding spec. (Pallas' GPU interpreter cannot run the
  Mosaic kernels on several simulated devices: its end-of-kernel check reads every device's barriers.)"""
  q, k, v, do = _inputs(2, 128, 4, 2, 64)
  fn = lambda q, k, v: ops.xla_attention(q, k, v, scale=0.125)  # noqa: E731
  want = jax.jit(lambda *a: _grads(fn, *a))(q, k, v, do)
  mesh = _mesh(data=2, tensor=2)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor", None)))  # noqa: E731
  with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
    got = jax.jit(lambda *a: _grads(lambda q, k, v: ops.per_shard(fn, q, k, v), *a))(*(put(x) for x in (q, k, v, do)))
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  errs = [float(np.abs(f32(g) - f32(w)).max() / np.abs(f32(w)).max()) for g, w in zip(got, want)]
  return errs, str(got[0].sharding.spec)


def mosaic_lowered_on_mesh(policy: str) -> dict:
  """A layer of attention.impl=mosaic (the compiled kernels, as on a Hopper GPU) under `jax.checkpoint` with remat
  `policy`, forward and backward on a data=2 x tensor=2 mesh, lowered for CUDA: the Mosaic GPU kernel calls and
  the shard_map bodies in the lowered module. Under dots_attention the forward kernel must not run again in the
  backward (2 calls at d 64: forward, fused backward), under full it must (3)."""
  mesh = _mesh(data=2, tensor=2)
  spec = NamedSharding(mesh, P("data", None, "tensor", None))
  q = jax.ShapeDtypeStruct((4, 512, 4, 64), jnp.bfloat16, sharding=spec)
  k = jax.ShapeDtypeStruct((4, 512, 2, 64), jnp.bfloat16, sharding=spec)

  def layer(q, k, v):
    return jnp.sin(ops.attention(q, k, v, impl="mosaic").astype(jnp.float32))

  def step(q, k, v, do):
    out, vjp = jax.vjp(jax.checkpoint(layer, policy=remat.POLICIES[policy]), q, k, v)
    return out, vjp(do.astype(jnp.float32))

  backend, cc = jax.default_backend, ops._compute_capability
  jax.default_backend, ops._compute_capability = (lambda: "gpu"), (lambda: (9, 0))  # the GPU path, not interpret
  try:
    with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
      text = jax.jit(step).trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    jax.default_backend, ops._compute_capability = backend, cc
  return dict(mosaic_calls=len(re.findall(r"stablehlo.custom_call @mosaic_gpu", text)),
              manual=text.count("manual_computation"))


def main():
  out = dict(
      dp2_tp2=seen_shapes(_mesh(data=2, tensor=2), 4, 4, 2),
      fsdp4=seen_shapes(_mesh(fsdp=4), 4, 4, 2),
      mqa_tp2=seen_shapes(_mesh(data=2, tensor=2), 2, 4, 1),  # one K/V head: the heads stay whole
      odd_batch=seen_shapes(_mesh(data=2), 3, 4, 2),  # 3 rows over 2 devices: nothing splits, fn runs whole
  )
  out["errors"], out["out_spec"] = per_shard_values()
  out["lowered"] = {policy: mosaic_lowered_on_mesh(policy) for policy in ("dots_attention", "full")}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
