"""Mixture of Experts FFN: fp32 top-k router, SwiGLU experts, Switch load-balancing and z losses.

One MoE layer is four stages, each its own function so that they can be swapped one at a time:

  route     x -> fp32 logits -> softmax -> top-k experts and (optionally renormalised) weights
  dispatch  token rows -> rows grouped by expert        (dropless: sort; capacity: fixed [E, C] slots)
  experts   grouped rows -> expert outputs              (only stage that touches expert weights)
  combine   expert outputs -> tokens, weighted sum over each token's k experts

`moe.capacity_factor <= 0` is dropless: the N*k token assignments are sorted by expert and the experts run as a
grouped matmul over the sorted rows (`moe.impl`: `jax.lax.ragged_dot`, or `pallas` = the kernels/gmm Pallas
kernel with its own backward), then unsorted and combined. `> 0` is capacity-based:
each expert keeps at most C = ceil(cf * N * k / E) assignments (every token's first choice before any second
choice, then token order, as GShard), runs as one batched matmul over an [E, C, D] buffer, and the overflow
contributes zero; the dropped fraction is reported.

Expert parallelism (models/moe_ep.py, `moe.expert_parallel`): with a mesh `expert` axis > 1 the dropless path runs
inside a shard_map that sends each device's expert-sorted rows to the device owning those experts (all-to-all over
`expert`) and back; route, the expert compute (`grouped_swiglu`) and the losses are the functions below, unchanged.

Aux outputs (the FFN contract of models/transformer.py: `_loss` keys join the training loss, the rest is
logged, everything is averaged over layers by the transformer):
  moe_aux_loss        aux_loss_coef * E * sum_e f_e * P_e (Switch), f_e = fraction of the N*k assignments routed
                      to e (before capacity drops), P_e = mean router probability of e; 1.0 * coef when balanced
  moe_z_loss          z_loss_coef * mean_tokens(logsumexp(logits)^2) (ST-MoE router z-loss)
  moe_balance         E * sum_e f_e * P_e unweighted (1.0 = perfectly balanced)
  moe_router_z        mean logsumexp(logits)^2 unweighted
  moe_router_entropy  mean per-token entropy of the router softmax (nats; log E = uniform)
  moe_load            [E] f_e, fraction of routed assignments per expert (logged as moe_load_0 ...)
  moe_dropped_frac    fraction of the N*k assignments dropped by capacity (0 when dropless)
Both `_loss` entries are emitted multiplied by model.num_layers, so the transformer's layer mean yields their
SUM over layers: Switch, ST-MoE and Megatron-Core (the EfficientLLM scripts) add every MoE layer's loss with the
full coefficient.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from efficientllm_jax.kernels import gmm as gmm_lib
from efficientllm_jax.models import remat
from efficientllm_jax.models.layers import SwiGLU, dense, dtype, normal_init

F32 = jnp.float32
# Logical axes of the stacked expert weights: gate/up [E, D, F], down [E, F, D].
EXPERT_IN = ("expert", "embed", "mlp")
EXPERT_OUT = ("expert", "mlp", "embed")


class Routing(NamedTuple):
  logits_ne: jax.Array  # fp32 router logits
  probs_ne: jax.Array  # fp32 softmax over all experts
  weights_nk: jax.Array  # fp32 combine weights of the chosen experts
  experts_nk: jax.Array  # int32 chosen expert ids, best first


def route(logits_ne, top_k: int, renormalize: bool) -> Routing:
  """Softmax over all experts, top-k; renormalised weights sum to 1 per token (Mixtral), raw ones do not."""
  logits_ne = logits_ne.astype(F32)
  probs_ne = jax.nn.softmax(logits_ne, axis=-1)
  weights_nk, experts_nk = jax.lax.top_k(probs_ne, top_k)
  if renormalize:
    weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
  return Routing(logits_ne, probs_ne, weights_nk, experts_nk.astype(jnp.int32))


def expert_load(experts_nk, num_experts: int):
  """[E] fraction of the N*k routed assignments that chose each expert (sums to 1)."""
  counts = jnp.bincount(experts_nk.reshape(-1), length=num_experts)
  return counts.astype(F32) / experts_nk.size


def balance_loss(probs_ne, experts_nk):
  """Switch load-balancing term E * sum_e f_e * P_e (unweighted); f carries no gradient, P does."""
  num_experts = probs_ne.shape[-1]
  f_e = jax.lax.stop_gradient(expert_load(experts_nk, num_experts))
  p_e = jnp.mean(probs_ne, axis=0)
  return num_experts * jnp.sum(f_e * p_e)


def router_z(logits_ne):
  """ST-MoE z term: mean over tokens of logsumexp(logits)^2 (unweighted)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_ne, axis=-1)))


def router_entropy(logits_ne):
  logp_ne = jax.nn.log_softmax(logits_ne, axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(logp_ne) * logp_ne, axis=-1))


# ----- dropless dispatch: sort assignments by expert, grouped matmul, unsort -----

class SortedPlan(NamedTuple):
  order_m: jax.Array  # sorted row i holds assignment order_m[i] = token * k + choice
  inverse_m: jax.Array  # position of assignment m = (token, choice) in the expert-sorted rows
  group_sizes_e: jax.Array  # int32 rows per expert, in expert order


def inverse_permutation(order):
  """inverse[order[i]] = i: the position each original row takes in x[order]."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)


# The two row permutations of the dropless path, each with a gather as its backward. Autodiff of a gather is a
# scatter-add, which XLA cannot know to be a permutation (duplicate indices are possible in general): on GPU it
# runs as an atomic scatter. Both permutations' inverses are known, so the backward gathers instead.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def expand_sorted(x_nd, order_m, inverse_m, k: int):
  """x_nd[order_m // k]: each token's row once per choice, in expert-sorted order ([N*k, D])."""
  return jnp.take(x_nd, order_m // k, axis=0)


def _expand_fwd(x_nd, order_m, inverse_m, k):
  return expand_sorted(x_nd, order_m, inverse_m, k), inverse_m


def _expand_bwd(k, inverse_m, g_md):
  # Token n's gradient: the sum of its k sorted rows' gradients, which sit at inverse_m[n * k + j].
  g_nkd = jnp.take(g_md, inverse_m, axis=0).reshape(-1, k, g_md.shape[-1])
  return jnp.sum(g_nkd.astype(F32), axis=1).astype(g_md.dtype), None, None


expand_sorted.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def unsort_rows(y_md, order_m, inverse_m):
  """y_md[inverse_m]: sorted rows back in assignment order (token * k + choice)."""
  return jnp.take(y_md, inverse_m, axis=0)


def _unsort_fwd(y_md, order_m, inverse_m):
  return unsort_rows(y_md, order_m, inverse_m), order_m


def _unsort_bwd(order_m, g_md):
  return jnp.take(g_md, order_m, axis=0), None, None


unsort_rows.defvjp(_unsort_fwd, _unsort_bwd)


def dispatch_sorted(x_nd, experts_nk, num_experts: int):
  """Rows [N*k, D] sorted by expert (stable: token order inside a group) and the plan to undo it."""
  n, k = experts_nk.shape
  flat_m = experts_nk.reshape(-1)
  order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
  inverse_m = inverse_permutation(order_m)
  x_md = expand_sorted(x_nd, order_m, inverse_m, k)
  group_sizes_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
  return x_md, SortedPlan(order_m, inverse_m, group_sizes_e)


def combine_sorted(y_md, weights_nk, plan: SortedPlan):
  """Unsorts expert outputs and returns sum_k w_nk * y_nkd in the rows' dtype (sum in fp32)."""
  n, k = weights_nk.shape
  y_nkd = unsort_rows(y_md, plan.order_m, plan.inverse_m).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_nkd.astype(F32), weights_nk).astype(y_md.dtype)


# ----- capacity dispatch: fixed [E, C] slots, overflow dropped -----

class CapacityPlan(NamedTuple):
  slot_nk: jax.Array  # flat slot e * C + position of each assignment; >= E * C (out of range) when dropped
  keep_nk: jax.Array  # bool, assignment kept


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """ceil(factor * N * k / E), capped at N (an expert sees each token at most once)."""
  return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))


def dispatch_capacity(x_nd, experts_nk, num_experts: int, cap: int):
  """Buffer [E, C, D] of kept rows (zeros in empty slots), the plan, and the number of dropped assignments.

  Priority inside an expert: all first choices (in token order), then all second choices, ... (GShard).
  """
  n, k = experts_nk.shape
  e_j = experts_nk.T.reshape(-1)  # j = choice * N + token
  onehot_je = jax.nn.one_hot(e_j, num_experts, dtype=jnp.int32)
  pos_j = jnp.sum((jnp.cumsum(onehot_je, axis=0) - 1) * onehot_je, axis=-1)
  keep_j = pos_j < cap
  # Dropped assignments get distinct out-of-range slots: the scatter skips them and indices stay unique.
  slot_j = jnp.where(keep_j, e_j * cap + pos_j, num_experts * cap + jnp.arange(n * k))
  tok_j = jnp.arange(n * k) % n
  buf = jnp.zeros((num_experts * cap, x_nd.shape[-1]), x_nd.dtype)
  buf = buf.at[slot_j].set(jnp.take(x_nd, tok_j, axis=0), mode="drop", unique_indices=True)
  plan = CapacityPlan(slot_j.reshape(k, n).T, keep_j.reshape(k, n).T)
  dropped = n * k - jnp.sum(keep_j.astype(jnp.int32))
  return buf.reshape(num_experts, cap, -1), plan, dropped


def combine_capacity(y_ecd, weights_nk, plan: CapacityPlan):
  """Gathers each assignment's slot (zero when dropped) and returns sum_k w_nk * y_nkd."""
  e, c, d = y_ecd.shape
  y_nkd = jnp.take(y_ecd.reshape(e * c, d), plan.slot_nk, axis=0, mode="fill", fill_value=0)
  return jnp.einsum("nkd,nk->nd", y_nkd.astype(F32), weights_nk).astype(y_ecd.dtype)


# ----- modules -----

def resolve_impl(impl: str, local: bool = False) -> str:
  """moe.impl=auto: the Pallas grouped matmul on one GPU (measured 5x faster than ragged_dot there,
  benchmarks/RESULTS.md), else ragged_dot (CPU: interpret mode would be slow; several devices: the kernel is a
  custom call GSPMD cannot partition, so it would gather its operands). `local`: the call sees one device's
  arrays (inside the expert-parallel shard_map), so the kernel needs no partitioning."""
  if impl != "auto":
    return impl
  one_device = local or jax.device_count() == 1
  return "pallas" if jax.default_backend() == "gpu" and one_device else "ragged_dot"


# Grouped-matmul tiles per projection (kernels/gmm), from a sweep at the MoE 0.5Bx8 shapes on an H200
# (benchmarks/RESULTS.md): the wide gate+up product (N = 2F) prefers 256-column tiles for its forward and weight
# gradient; the narrow down product (N = D) 256-row forward tiles and 256-column input-gradient tiles (its dx has
# N = F). Per pass, 0.5Bx8: gate+up fwd 2.29 / wgrad 2.36 ms (default tiles: dgrad 2.35, wgrad 2.60); down fwd
# 1.20 (1.46) / dgrad 1.31 (1.49) ms.
GATE_UP_TILES = gmm_lib.GmmConfig(fwd=gmm_lib.Tiling(128, 256, 64, 8, 3), dlhs=gmm_lib.Tiling(128, 128, 64, 8, 3),
                                  drhs=gmm_lib.Tiling(64, 256, 128, 8, 3))
DOWN_TILES = gmm_lib.GmmConfig(fwd=gmm_lib.Tiling(256, 128, 64, 8, 3), dlhs=gmm_lib.Tiling(128, 256, 64, 8, 3),
                               drhs=gmm_lib.Tiling(64, 128, 128, 8, 3))


@jax.custom_vjp
def swiglu_halves(h_mf2):
  """silu(h[:, :F]) * h[:, F:] for the fused gate+up output [M, 2F]. Its backward writes the [M, 2F] gradient
  once, as a concatenation; autodiff of the two slices adds two zero-padded [M, 2F] arrays instead (an H200
  profile of MoE 0.5Bx8 showed that add at 44.6 ms a step, twice the dense model's SwiGLU backward)."""
  f = h_mf2.shape[-1] // 2
  return jax.nn.silu(h_mf2[:, :f]) * h_mf2[:, f:]


def _swiglu_halves_fwd(h_mf2):
  return swiglu_halves(h_mf2), h_mf2


def _swiglu_halves_bwd(h_mf2, g_mf):
  f = h_mf2.shape[-1] // 2
  gate, up, g = h_mf2[:, :f].astype(F32), h_mf2[:, f:].astype(F32), g_mf.astype(F32)
  sig = jax.nn.sigmoid(gate)
  d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(x) / dx = sig(x) (1 + x (1 - sig(x)))
  d_up = g * gate * sig
  return (jnp.concatenate([d_gate, d_up], axis=-1).astype(h_mf2.dtype),)


swiglu_halves.defvjp(_swiglu_halves_fwd, _swiglu_halves_bwd)


def grouped_swiglu(x_md, gate_edf, up_edf, down_efd, group_sizes_e, impl: str):
  """Rows sorted by expert (group_sizes_e rows each; rows past their sum give zeros) -> SwiGLU outputs [M, D].
  Weights already in the compute dtype; one grouped matmul per projection."""
  named = lambda y: checkpoint_name(y, remat.GROUPED_MATMUL)  # noqa: E731 - kept by model.remat=dots_kernels
  if impl == "pallas":
    # gate and up as one [E, D, 2F] grouped matmul: x is read once and the kernel gets twice the columns.
    h_mf2 = named(gmm_lib.gmm(x_md, jnp.concatenate([gate_edf, up_edf], axis=-1), group_sizes_e,
                              config=GATE_UP_TILES))
    return named(gmm_lib.gmm(swiglu_halves(h_mf2), down_efd, group_sizes_e, config=DOWN_TILES))
  rd = lambda a, w: named(jax.lax.ragged_dot(a, w, group_sizes_e))  # noqa: E731
  return rd(jax.nn.silu(rd(x_md, gate_edf)) * rd(x_md, up_edf), down_efd)


class Experts(nnx.Module):
  """E SwiGLU experts, weights stacked [E, ...] with logical axis `expert` first (sharded over experts later)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    e, d, f = cfg.moe.num_experts, cfg.model.hidden, cfg.moe.expert_dim
    pdt = dtype(cfg.model.param_dtype)

    def param(names, shape):
      return nnx.Param(normal_init(cfg.model.init_std, names)(rngs.params(), shape, pdt))

    self.gate = param(EXPERT_IN, (e, d, f))
    self.up = param(EXPERT_IN, (e, d, f))
    self.down = param(EXPERT_OUT, (e, f, d))
    self.dtype = dtype(cfg.model.dtype)
    self.impl_setting = cfg.moe.get("impl", "auto")  # resolved per path: GSPMD-partitioned or per-device
    self.impl = resolve_impl(self.impl_setting)

  def cast(self, p):
    return p[...].astype(self.dtype)

  def grouped(self, x_md, group_sizes_e):
    """Rows sorted by expert (group_sizes_e rows each) -> outputs [M, D], one ragged matmul per projection."""
    return grouped_swiglu(x_md.astype(self.dtype), self.cast(self.gate), self.cast(self.up), self.cast(self.down),
                          group_sizes_e, self.impl)

  def batched(self, x_ecd):
    """Fixed-capacity buffer [E, C, D] -> outputs [E, C, D], one batched matmul per projection."""
    x_ecd = x_ecd.astype(self.dtype)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, self.cast(self.gate)))
    h = h * jnp.einsum("ecd,edf->ecf", x_ecd, self.cast(self.up))
    return jnp.einsum("ecf,efd->ecd", h, self.cast(self.down))


class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional shared experts). __call__(x_btd) -> (y_btd, aux) per the FFN contract."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    mo, m = cfg.moe, cfg.model
    self.num_experts = mo.num_experts
    self.top_k = mo.top_k
    self.renormalize = bool(mo.renormalize)
    self.capacity_factor = float(mo.capacity_factor)
    self.aux_loss_coef = float(mo.aux_loss_coef)
    self.z_loss_coef = float(mo.z_loss_coef)
    self.num_layers = m.num_layers
    self.expert_parallel = mo.get("expert_parallel", "auto")  # models/moe_ep.py
    self.ep_capacity_factor = float(mo.get("ep_capacity_factor", 0.0))
    self.ep_exchange = mo.get("ep_exchange", "auto")
    # The router stays fp32 whatever model.param_dtype says: fp32 logits need fp32 weights.
    self.router = nnx.Param(normal_init(m.init_std, ("embed", None))(rngs.params(), (m.hidden, mo.num_experts), F32))
    self.experts = Experts(cfg, rngs=rngs)
    # n shared experts of width w are one SwiGLU of width n * w (DeepSeek's fine-grained shared experts);
    # Qwen2-MoE scales their output per token by a sigmoid gate.
    shared_width = mo.num_shared_experts * (mo.shared_expert_dim or mo.expert_dim)
    self.shared = SwiGLU(cfg, rngs=rngs, width=shared_width) if shared_width else None
    gated = shared_width and mo.shared_expert_gate
    self.shared_gate = dense(m.hidden, 1, ("embed", None), cfg=cfg, rngs=rngs) if gated else None

  def router_logits(self, x_nd):
    return jnp.dot(x_nd.astype(F32), self.router[...], precision=jax.lax.Precision.HIGHEST)

  def routed(self, x_btd, r: Routing):
    """Dispatch -> experts -> combine; returns (y_nd, dropped assignment count)."""
    from efficientllm_jax.models import moe_ep  # noqa: PLC0415 - moe_ep builds on this module
    x_nd = x_btd.reshape(-1, x_btd.shape[-1])
    if self.capacity_factor > 0:
      cap = capacity(x_nd.shape[0], self.top_k, self.num_experts, self.capacity_factor)
      x_ecd, plan, dropped = dispatch_capacity(x_nd, r.experts_nk, self.num_experts, cap)
      return combine_capacity(self.experts.batched(x_ecd), r.weights_nk, plan), dropped.astype(F32)
    if ep := moe_ep.active(self.expert_parallel, x_btd.shape):  # (mesh, rules): all-to-all over `expert`
      return moe_ep.routed(self, x_btd, r, *ep)
    x_md, plan = dispatch_sorted(x_nd, r.experts_nk, self.num_experts)
    return combine_sorted(self.experts.grouped(x_md, plan.group_sizes_e), r.weights_nk, plan), jnp.zeros((), F32)

  def __call__(self, x_btd):
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    r = route(self.router_logits(x_nd), self.top_k, self.renormalize)
    y_nd, dropped = self.routed(x_btd, r)
    if self.shared is not None:
      s_nd, _ = self.shared(x_nd)
      if self.shared_gate is not None:
        s_nd = jax.nn.sigmoid(self.shared_gate(x_nd).astype(F32)).astype(s_nd.dtype) * s_nd
      y_nd = y_nd + s_nd
    balance, z = balance_loss(r.probs_ne, r.experts_nk), router_z(r.logits_ne)
    aux = {
        "moe_aux_loss": self.num_layers * self.aux_loss_coef * balance,
        "moe_z_loss": self.num_layers * self.z_loss_coef * z,
        "moe_balance": jax.lax.stop_gradient(balance),
        "moe_router_z": jax.lax.stop_gradient(z),
        "moe_router_entropy": jax.lax.stop_gradient(router_entropy(r.logits_ne)),
        "moe_load": expert_load(r.experts_nk, self.num_experts),
        "moe_dropped_frac": dropped / r.experts_nk.size,
    }
    return y_nd.reshape(b, t, d), aux


def reference_forward(moe: MoE, x_btd, keep_nk=None):
  """Plain per-expert loop for tests: every expert runs on every token, scaled by that token's routing weight.

  Routes on its own (softmax, top-k, renormalise) and ignores capacity unless `keep_nk` (bool [N, k], False =
  dropped) says which assignments survive. Returns y_btd in the model's compute dtype.
  """
  b, t, d = x_btd.shape
  x_nd = x_btd.reshape(b * t, d)
  logits_ne = jnp.dot(x_nd.astype(F32), moe.router[...], precision=jax.lax.Precision.HIGHEST)
  probs_ne = jnp.exp(logits_ne - jnp.max(logits_ne, -1, keepdims=True))
  probs_ne = probs_ne / jnp.sum(probs_ne, -1, keepdims=True)
  top_w, top_e = jax.lax.top_k(probs_ne, moe.top_k)
  if moe.renormalize:
    top_w = top_w / jnp.sum(top_w, -1, keepdims=True)
  if keep_nk is not None:
    top_w = top_w * keep_nk
  ex = moe.experts
  xc = x_nd.astype(ex.dtype)
  y_nd = jnp.zeros((b * t, d), F32)
  for e in range(moe.num_experts):
    h = jax.nn.silu(xc @ ex.cast(ex.gate)[e]) * (xc @ ex.cast(ex.up)[e])
    w_n = jnp.sum(jnp.where(top_e == e, top_w, 0.0), axis=-1)
    y_nd = y_nd + w_n[:, None] * (h @ ex.cast(ex.down)[e]).astype(F32)
  y_nd = y_nd.astype(ex.dtype)
  if moe.shared is not None:
    s_nd, _ = moe.shared(x_nd)
    if moe.shared_gate is not None:
      s_nd = jax.nn.sigmoid(moe.shared_gate(x_nd).astype(F32)).astype(s_nd.dtype) * s_nd
    y_nd = y_nd + s_nd
  return y_nd.reshape(b, t, d)
