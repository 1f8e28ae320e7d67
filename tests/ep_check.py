"""Run by test_expert_parallel.py in one subprocess with 8 simulated CPU devices (XLA_FLAGS set before jax starts);
on a machine with 4 GPUs, `gpu_cases()` runs in-process (the GPU exchange and kernel).

Layer checks: one MoE layer on fresh random parameters and inputs; forward output, aux values and gradients (of a
random projection of the output plus the aux losses) on a mesh, against the same layer on one device with no mesh
(the dropless single-device path); with a small moe.ep_capacity_factor, drops against a count from the routing
alone. Then the GPU path lowered for an H100 (CPU run only). Prints one JSON line.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.moe import moe as moe_configs
from efficientllm_jax.models import moe as moe_lib
from efficientllm_jax.models import moe_ep
from efficientllm_jax.parallel import sharding as sh

# name -> (mesh sizes, moe overrides); every case but the capacity one compares with one shared reference.
CPU_CASES = {
    "ep2_fsdp2_tp2": (dict(fsdp=2, tensor=2, expert=2), {}),
    "ep4_dp2": (dict(data=2, expert=4), {}),
    "ep8": (dict(expert=8), {}),  # one expert per device: fewer local experts than top_k
    "ep4_dp2_gspmd": (dict(data=2, expert=4), {"expert_parallel": "gspmd"}),
    "ep4_fsdp2_cap": (dict(fsdp=2, expert=4), {"ep_capacity_factor": 0.75}),
}
GPU_CASES = {  # 4 GPUs: the default exchange and the Pallas grouped matmul (moe.impl=auto inside the shard_map)
    "ep4": (dict(expert=4), {}),
    "ep2_dp2": (dict(data=2, expert=2), {}),
    "ep2_tp2": (dict(tensor=2, expert=2), {}),
    "ep4_cap": (dict(expert=4), {"ep_capacity_factor": 0.75}),
}
LOSS_KEYS = ("moe_aux_loss", "moe_z_loss")
AUX_KEYS = LOSS_KEYS + ("moe_balance", "moe_router_z", "moe_load", "moe_dropped_frac")


def layer_cfg(**moe):
  c = moe_configs.get_config("tiny")
  c.model.hidden = 32
  c.moe.expert_dim = 48
  c.moe.z_loss_coef = 0.01
  c.moe.update(moe)
  return c


def make_mesh(sizes):
  shape = [sizes.get(a, 1) for a in sh.MESH_AXES]
  return jax.make_mesh(shape, sh.MESH_AXES, devices=jax.devices()[:math.prod(shape)],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)


def layer_fn(cfg, r_btd):
  """(state, x) -> (y, aux, grads wrt (state, x)) of sum(y * r) + the aux losses."""
  graphdef = nnx.graphdef(moe_lib.MoE(cfg, rngs=nnx.Rngs(0)))

  def f(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) * r_btd) + sum(aux[k] for k in LOSS_KEYS), (y, aux)

  def run(state, x):
    (_, (y, aux)), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, x)
    return y, aux, g

  return run


def on_mesh(cfg, fn, state, x_btd, mesh):
  """jit(fn) traced inside the mesh's activation context, inputs placed by the sharding rules (as train_step)."""
  rules = sh.rules_of(cfg)
  x_sh = jax.sharding.NamedSharding(mesh, sh.logical_to_spec(moe_ep.TOKEN_NAMES, x_btd.shape, mesh, rules))

  def in_mesh(state, x):
    with sh.activation_sharding(mesh, rules):
      return fn(state, x)

  return jax.jit(in_mesh), (jax.device_put(state, sh.param_shardings(state, mesh, rules)), jax.device_put(x_btd, x_sh))


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def per_assignment_outputs(moe, x_btd):
  """[N, k, D] weighted output of each (token, choice) by a per-assignment loop, and the chosen experts."""
  d = x_btd.shape[-1]
  x_nd = x_btd.reshape(-1, d)
  r = moe_lib.route(moe.router_logits(x_nd), moe.top_k, moe.renormalize)
  ex = moe.experts
  out = []
  for j in range(moe.top_k):
    g, u, dn = (ex.cast(w)[r.experts_nk[:, j]] for w in (ex.gate, ex.up, ex.down))
    h = jax.nn.silu(jnp.einsum("nd,ndf->nf", x_nd, g)) * jnp.einsum("nd,ndf->nf", x_nd, u)
    out.append(r.weights_nk[:, j, None] * jnp.einsum("nf,nfd->nd", h, dn))
  return np.asarray(jnp.stack(out, 1)), np.asarray(r.experts_nk)


def expected_drops(experts_nk, sizes, num_experts, top_k, factor, n_global):
  """Assignments past the receive buffers, from the routing alone: in each group of `expert` devices (tokens are
  split over data, fsdp, expert with expert fastest), each destination is sent rows beyond its buffer."""
  s = sizes["expert"]
  shards = math.prod(sizes.values()) // sizes.get("tensor", 1)
  n = n_global // shards
  rows = moe_ep.buffer_rows(n, top_k, num_experts // s, s, factor)
  dest = experts_nk.reshape(shards // s, s * n * top_k) // (num_experts // s)  # [group, assignment]
  recv = np.stack([(dest == d).sum(axis=1) for d in range(s)], -1)  # [group, destination]
  return int(np.maximum(recv - rows, 0).sum())


class Counter:
  """Counts calls of moe_ep.routed (i.e. of the shard_map path) while tracing."""

  def __init__(self):
    self.calls, self._orig = 0, moe_ep.routed
    moe_ep.routed = self

  def __call__(self, *args):
    self.calls += 1
    return self._orig(*args)


COUNTER = None
SHAPE = (8, 16)  # batch, length


def inputs(cfg):
  module = moe_lib.MoE(cfg, rngs=nnx.Rngs(11))
  x = jax.random.normal(jax.random.key(12), SHAPE + (cfg.model.hidden,), jnp.float32)
  r = jax.random.normal(jax.random.key(13), x.shape, jnp.float32)
  return module, x, r


def layer_case(sizes, moe_kw, reference):
  cfg = layer_cfg(**moe_kw)
  module, x, r = inputs(cfg)
  calls = COUNTER.calls
  step, args = on_mesh(cfg, layer_fn(cfg, r), nnx.state(module), x, make_mesh(sizes))
  y1, aux1, g1 = step(*args)
  out = {"shard_map": COUNTER.calls > calls, "dropped_frac": float(aux1["moe_dropped_frac"])}
  y0, aux0, g0 = reference
  out["aux"] = {k: rel(aux1[k], aux0[k]) for k in AUX_KEYS if k != "moe_dropped_frac"}
  if "ep_capacity_factor" in moe_kw:
    # Each token's output must be the sum of a subset of its k weighted expert outputs (dropped ones are zero).
    o_nkd, experts_nk = per_assignment_outputs(module, x)
    n, k, d = o_nkd.shape
    masks = np.array([[(m >> j) & 1 for j in range(k)] for m in range(2 ** k)])
    err = np.linalg.norm(np.einsum("mk,nkd->nmd", masks, o_nkd) - np.asarray(y1).reshape(n, 1, d), axis=-1)
    best = err.argmin(1)
    out["subset_err"] = float(err[np.arange(n), best].max() / np.abs(o_nkd).max())
    out["dropped_by_output"] = int((1 - masks[best]).sum())
    out["dropped_reported"] = round(out["dropped_frac"] * n * k)
    out["dropped_expected"] = expected_drops(experts_nk, sizes, cfg.moe.num_experts, k, cfg.moe.ep_capacity_factor, n)
    return out
  out["y"] = rel(y1, y0)
  out["grads"] = {jax.tree_util.keystr(p): rel(a, b) for (p, a), b in
                  zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0))}
  return out


def gpu_lowering():
  """The GPU path, which XLA:CPU cannot run, traced and lowered for an H100, backward included: bf16, the Pallas
  grouped matmul compiled (not interpreted) inside the shard_map, the ragged_all_to_all exchange. Counts its ops."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415 - private, pinned jax
  pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(
      gpu_info.GpuVersion.H100)
  gmm = moe_lib.gmm_lib.gmm
  moe_lib.gmm_lib.gmm = functools.partial(gmm, interpret=False)
  try:
    cfg = layer_cfg(impl="pallas", ep_exchange="ragged_all_to_all")
    cfg.model.dtype = "bfloat16"
    module, x, r = inputs(cfg)
    step, args = on_mesh(cfg, layer_fn(cfg, r), nnx.state(module), x, make_mesh(dict(fsdp=2, tensor=2, expert=2)))
    hlo = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    moe_lib.gmm_lib.gmm = gmm
  return {"ragged_all_to_all": hlo.count("ragged_all_to_all"), "triton_kernels": hlo.count("__gpu$xla.gpu.triton")}


def run_cases(cases: dict) -> dict:
  global COUNTER
  COUNTER = COUNTER or Counter()
  cfg = layer_cfg()
  module, x, r = inputs(cfg)
  reference = jax.jit(layer_fn(cfg, r))(nnx.state(module), x)  # one device, no mesh: the dropless path
  return {name: layer_case(sizes, moe_kw, reference) for name, (sizes, moe_kw) in cases.items()}


def gpu_cases() -> dict:
  with jax.default_matmul_precision("highest"):  # fp32 on both sides, no TF32
    return run_cases(GPU_CASES)


if __name__ == "__main__":
  result = run_cases(CPU_CASES)
  result["gpu_lowering"] = gpu_lowering()
  print(json.dumps(result))
