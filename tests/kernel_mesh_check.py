"""Run by test_sharding.py in one subprocess with 4 simulated CPU devices (XLA_FLAGS set before jax starts).

`ops.per_shard`, which runs the attention kernels (Pallas calls XLA cannot partition) per device on a mesh: the
per-device shapes the wrapped function sees (batch over data / fsdp, heads over tensor when every head count
divides, whole otherwise); values and gradients through it on a data=2 x tensor=2 mesh against no mesh, for the
xla path, the Pallas flash kernel with a T5 bias (interpreted; the bias coefficients split with the heads) and the
NSA kernels (interpreted); the Mosaic GPU kernels through it lowered for CUDA on that mesh; the loss with
train.loss_impl=pallas on a data=2 mesh against impl=xla. Prints one JSON line.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientllm_jax.kernels.nsa import kernel as nsa_kernel
from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import nsa, ops
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


def _on_mesh(fn, args, layouts, out_layouts, cot=None):
  """Max error, relative to the largest value, of fn's outputs and (given `cot`) of the gradients of
  sum(outputs * cot) in every argument, run through per_shard on a data=2 x tensor=2 mesh (inputs placed by their
  layouts) against fn with no mesh; and the first output's sharding spec."""
  def grads(run, *a):
    if cot is None:
      return run(*a)
    outs, vjp = jax.vjp(run, *a)
    return outs, vjp(jax.tree.map(lambda o, c: c.astype(o.dtype), outs, cot))

  want = jax.jit(lambda *a: grads(fn, *a))(*args)
  mesh = _mesh(data=2, tensor=2)
  axes = {"b": "data", "h": "tensor", "k": "tensor"}
  placed = [jax.device_put(x, NamedSharding(mesh, P(*(axes.get(c) for c in lay)))) for x, lay in zip(args, layouts)]
  with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
    sharded = lambda *a: ops.per_shard(fn, *a, layouts=layouts, out_layouts=out_layouts)  # noqa: E731
    got = jax.jit(lambda *a: grads(sharded, *a))(*placed)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  errs = [float(np.abs(f32(g) - f32(w)).max() / max(np.abs(f32(w)).max(), 1e-30))
          for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  return errs, str(jax.tree.leaves(got)[0].sharding.spec)


def per_shard_values():
  """{path: (errors, first output's spec)} for the Pallas flash kernel with a T5-style step bias (GQA: each
  device holds 2 of the 4 query heads and the 1 of the 2 K/V heads they read; the coefficients [N, H] split with
  the heads, and their gradient sums over the batch shards), values and gradients; and the shapes the NSA kernels
  see and return on the mesh (compressed K/V, block ids). (Pallas' GPU
  interpreter cannot run the Mosaic kernels on several simulated devices: its end-of-kernel check reads every
  device's barriers; they are lowered instead, below.)"""
  qkv = ("bthd", "bskd", "bskd")
  out = {}

  thresholds = (0, 1, 2, 4, 8, 16)
  coef = jax.random.normal(jax.random.key(4), (len(thresholds), 4), jnp.float32)

  class StepBias:  # what positional.RelativeBias hands the kernel: bias(d) = sum_n [d >= thr_n] coef[n, h]
    def __init__(self, c):
      self.c = c

    def kernel_terms(self):
      return "step", thresholds, self.c

  q32, k32, v32, do32 = _inputs(2, 64, 4, 2, 32)
  flash = lambda q, k, v, c: ops.pallas_attention(q, k, v, scale=0.2, bias=StepBias(c))  # noqa: E731
  out["pallas_t5"] = _on_mesh(flash, (q32, k32, v32, coef), (*qkv, "nh"), "bthd", do32)

  # the NSA kernels: per-device shapes of their inputs and outputs (compressed K/V "bnkd", block ids "bktn")
  geom = dict(compress_block=16, compress_stride=8, select_block=16, num_selected=4, local_blocks=1,
              blocks=nsa_kernel.Blocks(cmp_q=16, cmp_k=16, slc_q=16, interpret=True))
  t, nc = 64, nsa.num_compressed(64, 16, 8)
  qn, ks = (jax.ShapeDtypeStruct((4, t, h, 16), jnp.float32) for h in (4, 2))
  kc = jax.ShapeDtypeStruct((4, nc, 2, 16), jnp.float32)
  seen = []

  def branches(*a):
    seen.append([list(x.shape) for x in a])
    return nsa.sparse_branches_pallas(*a, **geom)
  with sh.activation_sharding(_mesh(data=2, tensor=2), dict(sh.DEFAULT_RULES)):
    outs = jax.eval_shape(lambda *a: ops.per_shard(branches, *a, layouts=("bthd", "bnkd", "bnkd", "bskd", "bskd"),
                                                   out_layouts=("bthd", "bthd", "bktn")), qn, kc, kc, ks, ks)
  out["nsa_shapes"] = dict(inside=seen, outputs=[list(o.shape) for o in outs])
  return out


def mosaic_lowered_on_mesh(policy: str = "dots_attention") -> dict:
  """A layer of attention.impl=mosaic (the compiled kernels, as on a Hopper GPU) under `jax.checkpoint` with remat
  `policy`, forward and backward on a data=2 x tensor=2 mesh, lowered for CUDA: {kernel: calls} of the Mosaic GPU
  kernels (mosaic_flash_forward / _dq / _dkv) and the number of shard_map bodies in the lowered module. Under
  dots_attention the forward kernel must not run again in the backward: one forward call."""
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
  calls = [re.search(r"mosaic_flash_(forward|dq|dkv)", line).group(1) for line in text.splitlines()
           if "stablehlo.custom_call @mosaic_gpu" in line]
  return dict(kernels={k: calls.count(k) for k in sorted(set(calls))}, manual=text.count("manual_computation"))


def loss_kernel_on_mesh() -> list[float]:
  """train.loss_impl=pallas under the loss's own shard_map (rows over data=2): loss and both gradients against
  impl=xla, relative errors. Off the GPU the kernel is interpreted, and inside a shard_map kernels/xent then runs
  its jnp reference (the interpreter fails the varying-axes check), so this checks the sharded plumbing and the
  table gradient's one sum over devices, not the Triton code."""
  from efficientllm_jax.train.loss import cross_entropy  # noqa: PLC0415
  mesh = _mesh(data=2)
  rules = {"batch": ("data", "fsdp")}
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(4, 9, 16)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(300, 16)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, 300, (4, 9)))

  def run(impl):
    def loss(h, e):
      with sh.activation_sharding(mesh, rules):
        return cross_entropy(h, e, y, chunk=8, impl=impl)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, e)

  got, want = run("pallas"), run("xla")
  return [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(jax.tree.leaves(got),
                                                                               jax.tree.leaves(want))]


def main():
  out = dict(
      dp2_tp2=seen_shapes(_mesh(data=2, tensor=2), 4, 4, 2),
      fsdp4=seen_shapes(_mesh(fsdp=4), 4, 4, 2),
      mqa_tp2=seen_shapes(_mesh(data=2, tensor=2), 2, 4, 1),  # one K/V head: the heads stay whole
      odd_batch=seen_shapes(_mesh(data=2), 3, 4, 2),  # 3 rows over 2 devices: nothing splits, fn runs whole
  )
  out["values"] = per_shard_values()
  out["lowered"] = mosaic_lowered_on_mesh()
  out["loss_kernel"] = loss_kernel_on_mesh()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
