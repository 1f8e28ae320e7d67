"""Expert parallelism for the dropless MoE: one jax.shard_map over the mesh, all-to-all over `expert`.

Used when the mesh's `expert` axis has S > 1 devices and `moe.expert_parallel` is auto or shard_map (config.py
checks the rest: dropless, E divisible by S, the `expert` and `batch` rules). Each device holds E/S experts (the
weights' expert dimension is sharded over `expert`) and its own tokens (the `batch` rule splits them over data,
fsdp and expert). Routing and the aux losses stay outside, in GSPMD over the global batch, so they are exactly the
values of the non-EP path. Inside, each device

  1. sorts its n*k assignments by expert (moe.dispatch_sorted): the rows bound for each device form one
     contiguous chunk, itself sorted by that device's local experts;
  2. all-gathers its [S, E/S] assignment counts over `expert`: every device then knows the whole
     [source, destination, local expert] table, hence every offset of both exchanges, with no other handshake;
  3. sends each chunk to its owner, regroups what arrived by local expert, and runs moe.grouped_swiglu on its local
     experts: an fsdp-sharded embed dim is all-gathered (its transpose reduce-scatters the gradient), a
     tensor-sharded mlp dim stays split (Megatron) and the combined output is psum'd over `tensor`;
  4. sends the outputs back along the reversed routes and combines them with the routing weights.

Receive buffer. Static shapes need a bound on the rows that can reach one device. The dropless bound is
S * n * min(k, E/S) rows (every token of every source picks this device's experts): S times the balanced load
n*k when E/S >= k. ragged_all_to_all moves only the routed rows and the matmuls skip rows past the group sizes
(ragged_dot's semantics, kernels/gmm's too), but the buffers' memory, the SwiGLU's elementwise work and the
kernel's zero stores scale with the bound. `moe.ep_capacity_factor` f > 0 sizes it ceil(f * n * k) rows instead
(1.0 = exactly the balanced load): sources fill it in order, the rows past its end are dropped (the tail of the
last sources' chunks, i.e. their last local experts), they contribute zero as in the capacity path, and their
fraction is moe_dropped_frac. Default: dropless, so every mesh trains the same model as one device.

Exchange (`moe.ep_exchange`): ragged_all_to_all (jax.lax.ragged_all_to_all; XLA:CPU lacks it) sends exactly the
routed rows; all_to_all emulates it with one jax.lax.all_to_all of [S, C, D] buffers padded to the per-pair bound C
and a scatter into place. auto: all_to_all everywhere. On 4 x H200 (JAX 0.11.2, MoE 1.5Bx8 over expert=4) XLA
refused ragged_all_to_all ("RaggedAllToAll fallback to NCCL is not allowed"); with
--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true it ran 4.27 s a step against 1.77 s for all_to_all
and ended 10 steps at another loss (12.24 vs 9.84), so it stays opt-in and unverified on GPU.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from efficientllm_jax.models import moe as moe_lib
from efficientllm_jax.parallel import sharding as sh

EXPERT = "expert"
TOKEN_NAMES = ("batch", "length", None)  # x_btd's logical axes; the embed dim stays whole inside

_logged: set[str] = set()


def token_axes(shape_btd, mesh, rules) -> tuple[str, ...]:
  """Mesh axes the tokens of x_btd are split over (batch then length)."""
  spec = sh.logical_to_spec(TOKEN_NAMES, shape_btd, mesh, rules)
  return sh.mesh_axes(spec[0]) + sh.mesh_axes(spec[1])


def active(mode: str, shape_btd) -> tuple | None:
  """(mesh, rules) when this call runs expert-parallel, else None (the GSPMD path): a mesh is active (training and
  eval steps trace inside one), its `expert` axis is > 1 and the tokens are split over it."""
  ctx = sh.active_mesh()
  if mode == "gspmd" or ctx is None or ctx[0].shape.get(EXPERT, 1) == 1:
    return None
  mesh, rules = ctx
  if EXPERT not in token_axes(shape_btd, mesh, rules):
    msg = (f"moe.expert_parallel: tokens {tuple(shape_btd)} are not split over the `expert` mesh axis (batch rule "
           f"{rules.get('batch')!r}, batch not divisible?), so each device would hold every token")
    if mode == "shard_map":
      raise ValueError(msg + ": make the batch a multiple of the data-parallel devices or use gspmd")
    if msg not in _logged:
      _logged.add(msg)
      logging.info("%s; using the GSPMD path", msg)
    return None
  return mesh, rules


def resolve_exchange(exchange: str) -> str:
  if exchange != "auto":
    return exchange
  return "all_to_all"  # measured faster, and the ragged exchange is unverified on GPU (module docstring)


def buffer_rows(n: int, k: int, experts_per_device: int, devices: int, capacity_factor: float) -> int:
  """Rows of one device's receive buffer: the dropless bound, or ceil(f * n * k) when f > 0 (never above it)."""
  dropless = devices * n * min(k, experts_per_device)
  return dropless if capacity_factor <= 0 else max(1, min(dropless, math.ceil(capacity_factor * n * k)))


# ----- the exchange plan: every offset from the all-gathered count table -----

class Plan(NamedTuple):
  """Sizes and offsets of both exchanges on this device (me); [S] arrays indexed by the peer device."""
  send_off_s: jax.Array  # where my chunk for peer s starts in my expert-sorted rows
  send_s: jax.Array  # rows I send to peer s (after capacity)
  land_off_s: jax.Array  # where my chunk lands in peer s's receive buffer
  recv_s: jax.Array  # rows I receive from peer s
  recv_off_s: jax.Array  # where peer s's chunk lands in my receive buffer
  back_off_s: jax.Array  # where peer s's chunk started in its sorted rows (the return trip's destination)
  groups_e: jax.Array  # rows per local expert in my receive buffer
  recv_kept_se: jax.Array  # rows per (source, local expert) in my receive buffer, in buffer order
  dropped: jax.Array  # my assignments cut by the buffer


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def plan(counts_se, rows: int) -> Plan:
  """counts_se: my assignments per (destination device, its local expert); rows: receive-buffer size."""
  me = jax.lax.axis_index(EXPERT)
  all_sde = jax.lax.all_gather(counts_se, EXPERT)  # [source, destination, local expert]
  tot_sd = jnp.sum(all_sde, axis=-1)
  land_sd = _exclusive_cumsum(tot_sd, 0)  # sources fill each destination's buffer in order
  kept_sd = jnp.clip(rows - land_sd, 0, tot_sd)
  land_sd = jnp.minimum(land_sd, rows)
  off_sd = _exclusive_cumsum(tot_sd, 1)
  recv_se = all_sde[:, me]
  # Capacity cuts the tail of each source's chunk, i.e. its last local experts.
  kept_se = jnp.clip(kept_sd[:, me, None] - _exclusive_cumsum(recv_se, 1), 0, recv_se)
  return Plan(send_off_s=off_sd[me], send_s=kept_sd[me], land_off_s=land_sd[me], recv_s=kept_sd[:, me],
              recv_off_s=land_sd[:, me], back_off_s=off_sd[:, me], groups_e=jnp.sum(kept_se, axis=0),
              recv_kept_se=kept_se, dropped=jnp.sum(tot_sd[me]) - jnp.sum(kept_sd[me]))


# ----- the two exchanges with ragged_all_to_all's semantics -----

def ragged_exchange(operand_md, out_rows, in_off_s, send_s, out_off_s, recv_s, pair_rows):
  del pair_rows
  out = jnp.zeros((out_rows, operand_md.shape[1]), operand_md.dtype)
  return jax.lax.ragged_all_to_all(operand_md, out, in_off_s, send_s, out_off_s, recv_s, axis_name=EXPERT)


def padded_exchange(operand_md, out_rows, in_off_s, send_s, out_off_s, recv_s, pair_rows):
  """ragged_all_to_all through one all_to_all of [S, pair_rows, D] (each chunk padded to the per-pair bound).
  Rows past a chunk's size travel as padding and are never written, so send_s needs no mask here."""
  del send_s
  s, d = in_off_s.shape[0], operand_md.shape[1]
  i_c = jnp.arange(pair_rows)
  rows_sc = jnp.minimum(in_off_s[:, None] + i_c, operand_md.shape[0] - 1)
  buf_scd = jax.lax.all_to_all(jnp.take(operand_md, rows_sc, axis=0), EXPERT, 0, 0, tiled=True)  # [source, ...]
  land_s = jax.lax.all_to_all(out_off_s, EXPERT, 0, 0, tiled=True)
  # Padding rows go to distinct out-of-range slots: the scatter drops them and indices stay unique.
  dest_sc = jnp.where(i_c < recv_s[:, None], land_s[:, None] + i_c, out_rows + jnp.arange(s * pair_rows).reshape(s, -1))
  out = jnp.zeros((out_rows, d), operand_md.dtype)
  return out.at[dest_sc.reshape(-1)].set(buf_scd.reshape(-1, d), mode="drop", unique_indices=True)


EXCHANGES = {"ragged_all_to_all": ragged_exchange, "all_to_all": padded_exchange}


# ----- per-device body -----

class Layout(NamedTuple):
  """Static facts of one shard_map body."""
  num_experts: int
  devices: int  # S, the `expert` axis size
  capacity_factor: float
  exchange: str
  impl: str
  dtype: jnp.dtype
  gather_embed: tuple[str, ...]  # mesh axes of the weights' embed dim (all-gathered inside)
  gather_mlp: tuple[str, ...]  # mesh axes of the mlp dim that also split the tokens (all-gathered)
  tensor_mlp: tuple[str, ...]  # mesh axes of the mlp dim that do not (tensor parallel: psum the output)


def _gather(w, dim, axes):
  return jax.lax.all_gather(w, axes, axis=dim, tiled=True) if axes else w


def regroup(kept_se, rows: int):
  """Receive-buffer rows (source-major, each source's rows sorted by local expert) -> the permutation that sorts
  them by local expert (stable), and its inverse; rows past the received ones sort last."""
  s, e = kept_se.shape
  ends = jnp.cumsum(kept_se.reshape(-1))
  seg_r = jnp.searchsorted(ends, jnp.arange(rows), side="right")
  expert_r = jnp.where(seg_r < s * e, seg_r % e, e)
  order_r = jnp.argsort(expert_r, stable=True)
  return order_r, moe_lib.inverse_permutation(order_r)


def local_moe(x_btd, w_btk, e_btk, gate, up, down, lay: Layout):
  """One device: dispatch to the expert owners, grouped SwiGLU on the local experts, return, combine."""
  b, t, d = x_btd.shape
  n, k = b * t, e_btk.shape[-1]
  e_loc = lay.num_experts // lay.devices
  x_md, sorted_plan = moe_lib.dispatch_sorted(x_btd.reshape(n, d), e_btk.reshape(n, k), lay.num_experts)
  rows = buffer_rows(n, k, e_loc, lay.devices, lay.capacity_factor)
  pair_rows = min(rows, n * min(k, e_loc))
  p = plan(sorted_plan.group_sizes_e.reshape(lay.devices, e_loc), rows)
  exchange = functools.partial(EXCHANGES[lay.exchange], pair_rows=pair_rows)

  x_rd = exchange(x_md, rows, p.send_off_s, p.send_s, p.land_off_s, p.recv_s)
  order_r, inverse_r = regroup(p.recv_kept_se, rows)
  gate, up = (_gather(_gather(w, 1, lay.gather_embed), 2, lay.gather_mlp) for w in (gate, up))
  down = _gather(_gather(down, 2, lay.gather_embed), 1, lay.gather_mlp)
  y_rd = moe_lib.grouped_swiglu(jnp.take(x_rd, order_r, axis=0).astype(lay.dtype), gate, up, down, p.groups_e,
                                lay.impl)
  y_rd = jnp.take(y_rd, inverse_r, axis=0)
  y_md = exchange(y_rd, n * k, p.recv_off_s, p.recv_s, p.back_off_s, p.send_s)
  y_nd = moe_lib.combine_sorted(y_md, w_btk.reshape(n, k), sorted_plan)
  if lay.tensor_mlp:  # each tensor rank holds a slice of every expert's width: partial sums
    y_nd = jax.lax.psum(y_nd, lay.tensor_mlp)
  return y_nd.reshape(b, t, d), p.dropped.reshape(1).astype(jnp.float32)


def routed(moe, x_btd, r: moe_lib.Routing, mesh, rules):
  """The MoE's routed experts, expert-parallel: (y_nd, dropped assignment count) as MoE.routed returns."""
  b, t, d = x_btd.shape
  k = r.experts_nk.shape[-1]
  x_spec = sh.logical_to_spec(TOKEN_NAMES, x_btd.shape, mesh, rules)
  tokens = token_axes(x_btd.shape, mesh, rules)
  ex = moe.experts
  w_in = sh.logical_to_spec(moe_lib.EXPERT_IN, ex.gate.shape, mesh, rules)
  w_out = sh.logical_to_spec(moe_lib.EXPERT_OUT, ex.down.shape, mesh, rules)
  if sh.mesh_axes(w_in[0]) != (EXPERT,):
    raise ValueError(f"moe.expert_parallel: expert weights are sharded {w_in}, not over `expert` on their expert "
                     "dim: keep sharding_rules ('expert', 'expert') and moe.num_experts divisible by mesh.shape.expert")
  mlp = sh.mesh_axes(w_in[2])
  split_tokens = bool(set(mlp) & set(tokens))
  lay = Layout(num_experts=moe.num_experts, devices=mesh.shape[EXPERT], capacity_factor=moe.ep_capacity_factor,
               exchange=resolve_exchange(moe.ep_exchange), impl=moe_lib.resolve_impl(ex.impl_setting, local=True),
               dtype=ex.dtype, gather_embed=sh.mesh_axes(w_in[1]), gather_mlp=mlp if split_tokens else (),
               tensor_mlp=() if split_tokens else mlp)
  body = jax.shard_map(functools.partial(local_moe, lay=lay), mesh=mesh,
                       in_specs=(x_spec, x_spec, x_spec, w_in, w_in, w_out),  # x, routing weights, expert ids
                       out_specs=(x_spec, P(tokens)))  # y, assignments dropped per token shard
  y_btd, dropped = body(x_btd, r.weights_nk.reshape(b, t, k), r.experts_nk.reshape(b, t, k),
                        ex.cast(ex.gate), ex.cast(ex.up), ex.cast(ex.down))
  return y_btd.reshape(b * t, d), jnp.sum(dropped)
