"""The GPU kernels on a mesh of real GPUs (two or more; skipped elsewhere): the Mosaic GPU attention kernels and
the loss kernel (kernels/xent), each run per device under a shard_map, against the same computation on one device.

On CPU, tests/kernel_mesh_check.py covers the plumbing (shapes each device sees, interpreted kernels, the Mosaic
kernels lowered for CUDA on a mesh); these run the compiled kernels on the devices themselves, with the operands
placed as the train step places them (batch over `data`, heads over `tensor`). Until they pass on such a machine,
`attention.impl=auto` and `train.loss_impl=auto` keep cuDNN and XLA on a mesh of several GPUs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientllm_jax.models.attention import ops
from efficientllm_jax.parallel import sharding as sh

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2,
                       reason="needs two or more GPUs (compiled kernels on a mesh)"),
]


def _mesh(**sizes):
  shape = tuple(sizes.get(a, 1) for a in sh.MESH_AXES)
  return jax.make_mesh(shape, sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:math.prod(shape)])


def _qkv(b, t, h, kvh, d):
  ks = jax.random.split(jax.random.key(7), 4)
  q, do = (jax.random.normal(ks[i], (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for i in (0, 3))
  k, v = (jax.random.normal(ks[i], (b, t, kvh, d), jnp.float32).astype(jnp.bfloat16) for i in (1, 2))
  return q, k, v, do


def _attention_and_grads(impl, q, k, v, do, mesh=None):
  """ops.attention's output and (q, k, v) gradients, as one program; on `mesh` with the operands placed by their
  layouts (batch over data, heads over tensor) under the default sharding rules."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, impl=impl), q, k, v)
    return (out, *vjp(do))
  if mesh is None:
    return jax.jit(run)(q, k, v, do)
  place = NamedSharding(mesh, P("data", None, "tensor", None))
  args = [jax.device_put(x, place) for x in (q, k, v, do)]
  with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
    return jax.jit(run)(*args)


@pytest.mark.skipif(jax.default_backend() == "gpu" and ops._compute_capability() != (9, 0),
                    reason="the Mosaic GPU kernels need a Hopper GPU (sm_90)")
@pytest.mark.parametrize("mesh_sizes,b,h,kvh,d", [
    (dict(data=2), 4, 14, 2, 64),  # 0.5B's heads, the batch split (its step on two GPUs at micro-batch 8)
    (dict(data=2), 2, 12, 2, 128),  # 1.5B's heads
    (dict(tensor=2), 2, 14, 2, 64),  # the heads split: 7 query heads and their one K/V head a device
])
def test_mosaic_on_mesh_matches_one_device(mesh_sizes, b, h, kvh, d):
  """attention.impl=mosaic on a mesh: every device runs the kernels on its rows or heads (ops.per_shard), and the
  output and gradients equal the one-device run's (same kernels, same rows: within one bf16 rounding), and agree
  with cuDNN on the mesh at bf16 tolerance."""
  q, k, v, do = _qkv(b, 2048, h, kvh, d)
  mesh = _mesh(**mesh_sizes)
  got = _attention_and_grads("mosaic", q, k, v, do, mesh)
  one = _attention_and_grads("mosaic", q, k, v, do)
  cudnn = _attention_and_grads("cudnn", q, k, v, do, mesh)
  for name, g, w, c in zip(("out", "dq", "dk", "dv"), got, one, cudnn):
    assert g.shape == w.shape, name
    assert len(g.sharding.device_set) == mesh.size, (name, g.sharding)
    g, w, c = (np.asarray(x, np.float32) for x in (g, w, c))
    scale = float(np.abs(w).max())
    assert float(np.abs(g - w).max()) <= 8e-3 * scale, (name, "mesh vs one device")
    assert float(np.abs(g - c).max()) < 2e-2 * scale, (name, "mosaic vs cudnn on the mesh")


def test_loss_kernel_on_mesh_matches_xla():
  """train.loss_impl=pallas on a data=2 mesh (the Triton kernel per device under the loss's shard_map), 0.5B's
  width and the real vocabulary, bf16 logits: the summed loss and both gradients (hidden states and the tied
  table, summed over devices) against impl=xla on the same mesh."""
  from efficientllm_jax.train.loss import cross_entropy  # noqa: PLC0415
  mesh = _mesh(data=2)
  rng = np.random.default_rng(0)
  b, t, dim, vocab = 4, 1024, 896, 151936
  h = jax.device_put(jnp.asarray(rng.normal(size=(b, t, dim)), jnp.bfloat16), NamedSharding(mesh, P("data")))
  table = jnp.asarray(rng.normal(size=(vocab, dim)) * 0.02, jnp.float32)
  y = jax.device_put(jnp.asarray(rng.integers(0, vocab, (b, t))), NamedSharding(mesh, P("data")))

  def run(impl):
    def loss(h, e):
      with sh.activation_sharding(mesh, dict(sh.DEFAULT_RULES)):
        return cross_entropy(h, e, y, chunk=2048, logits_dtype="bfloat16", impl=impl)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, table)

  (lp, (dhp, dep)), (lx, (dhx, dex)) = run("pallas"), run("xla")
  assert abs(float(lp) - float(lx)) <= 1e-4 * abs(float(lx))
  for name, g, w in (("dh", dhp, dhx), ("dtable", dep, dex)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert float(np.abs(g - w).max()) <= 2e-2 * float(np.abs(w).max()), name
