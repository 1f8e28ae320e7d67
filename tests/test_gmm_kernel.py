"""Grouped-matmul kernel (kernels/gmm) in interpret mode against the per-group jnp loop: outputs, both gradients,
the visit schedule against a plain enumeration, and the MoE layer with moe.impl=pallas against ragged_dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.moe import moe as moe_configs
from efficientllm_jax import config as config_lib
from efficientllm_jax.kernels.gmm import GmmConfig, Tiling, gmm, grouped_matmul, visit_schedule
from efficientllm_jax.kernels.gmm import reference
from efficientllm_jax.models import moe as moe_lib

# 7 groups over 100 rows: empty groups (first, middle, last), a 1-row group, sizes off the 16-row tile, and
# 6 rows past the last group (zeros out, zero gradient in).
SIZES = np.array([0, 13, 40, 0, 7, 33, 1, 0], np.int32)
TILE = Tiling(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
SMALL = GmmConfig(TILE, TILE, Tiling(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_inputs(m=100, k=40, n=24, e=len(SIZES), dtype=jnp.float32, seed=0):
  """Fresh normal x [M, K], w [E, K, N] (scaled by 1/sqrt(K)) and a cotangent [M, N] (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), jnp.float32).astype(dtype)
  ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  return x, w, ct


def run_fast(fn, *args):
  """jit + run with XLA's cheapest CPU backend optimisation: interpreted kernels are compile-bound here."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def loop_reference(x, w, sizes):
  """numpy: one matmul per group over its rows, zeros past the last group."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for e, s in enumerate(sizes):
    y[start:start + s] = x[start:start + s] @ w[e]
    start += s
  return y


def test_schedule_visits_every_tile_group_pair_once():
  bm, m = 16, 100
  padded = 112
  group_v, tile_v, starts_g, ends_g = run_fast(lambda s: visit_schedule(s, m, padded, bm), jnp.asarray(SIZES))
  e = len(SIZES)
  assert group_v.shape == (padded // bm + e,)
  # Expected: every (tile, group) whose rows intersect, groups 0..E-1 and the tail pseudo-group E, in order.
  bounds = np.concatenate([[0], np.cumsum(SIZES), [padded]])
  want = [(t, g) for g in range(e + 1) for t in range(padded // bm)
          if max(bounds[g], t * bm) < min(bounds[g + 1], (t + 1) * bm)]
  got = [(int(t), int(g)) for t, g in zip(tile_v, group_v) if g <= e]
  assert got == want
  assert all(int(g) == e + 1 for g in group_v[len(want):])  # the unused tail is marked skip
  np.testing.assert_array_equal(starts_g[:e + 1], bounds[:-1])
  np.testing.assert_array_equal(ends_g[:e + 1], bounds[1:])


def test_gmm_output_and_gradients_match_reference_fp32():
  x, w, ct = random_inputs()
  sizes = jnp.asarray(SIZES)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w) * ct)

  kern = lambda x, w: gmm(x, w, sizes, config=SMALL, interpret=True)
  ref = lambda x, w: reference.gmm(x, w, sizes)
  (y, g), (y_ref, g_ref) = run_fast(lambda x, w: ((kern(x, w), jax.grad(loss(kern), (0, 1))(x, w)),
                                                   (ref(x, w), jax.grad(loss(ref), (0, 1))(x, w))), x, w)
  assert rel_err(y, loop_reference(x, w, SIZES)) < 1e-6
  assert rel_err(y, y_ref) < 1e-6
  assert not np.any(np.asarray(y)[SIZES.sum():])  # rows past the last group are zero
  dx, dw = g
  assert rel_err(dx, g_ref[0]) < 1e-6
  assert rel_err(dw, g_ref[1]) < 1e-6
  assert not np.any(np.asarray(dx)[SIZES.sum():])
  for e in np.flatnonzero(SIZES == 0):  # an empty group's weights get exactly zero gradient
    assert not np.any(np.asarray(dw)[e])


def test_gmm_bf16_accumulates_in_fp32():
  x, w, _ = random_inputs(m=64, k=96, n=32, dtype=jnp.bfloat16, seed=3)
  sizes = jnp.asarray(np.array([20, 0, 31, 13], np.int32))
  w = w[:4]
  tiling = Tiling(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
  y = run_fast(lambda x, w: grouped_matmul(x, w, sizes, tiling=tiling, interpret=True), x, w)
  assert y.dtype == jnp.bfloat16
  want = loop_reference(x, w, np.asarray(sizes))  # exact products of the bf16 inputs
  # fp32 accumulation: only the final rounding to bf16 (2^-8 relative) remains.
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2 ** -7, atol=1e-6)


def test_gmm_rejects_mixed_dtypes():
  x, w, _ = random_inputs()
  with pytest.raises(ValueError, match="gmm needs one dtype"):
    gmm(x, w.astype(jnp.bfloat16), jnp.asarray(SIZES))


def moe_cfg(impl):
  c = moe_configs.get_config("tiny")
  c.model.hidden = 24
  c.moe.num_experts = 4
  c.moe.expert_dim = 40
  c.moe.impl = impl
  return c


def test_moe_layer_pallas_equals_ragged_dot():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 23, 24)), jnp.float32)  # 46 tokens -> 92 routed rows
  r = jnp.asarray(rng.standard_normal((2, 23, 24)), jnp.float32)

  def run(impl):
    m = moe_lib.MoE(moe_cfg(impl), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] * r)
    return run_fast(lambda s, x: (nnx.merge(graphdef, s)(x)[0], jax.grad(loss, (0, 1))(s, x)), state, x)

  (y_p, (gs_p, gx_p)), (y_r, (gs_r, gx_r)) = run("pallas"), run("ragged_dot")
  assert rel_err(y_p, y_r) < 1e-5
  assert rel_err(gx_p, gx_r) < 1e-5
  leaves_p, leaves_r = jax.tree.leaves(gs_p), jax.tree.leaves(gs_r)
  assert len(leaves_p) == len(leaves_r) == 4  # router, gate, up, down
  for a, b in zip(leaves_p, leaves_r):
    assert rel_err(a, b) < 1e-5


def test_moe_impl_is_validated():
  c = moe_cfg("triton")
  with pytest.raises(config_lib.ConfigError, match=r"moe.impl='triton' is not known: use one of auto, ragged_dot, pallas"):
    config_lib.validate(c)
  config_lib.validate(moe_cfg("pallas"))


def test_kernels_lower_to_triton_for_h100(monkeypatch):
  """Without a GPU: the three kernels (fwd, dx, dw) go through Pallas' Triton lowering for an H100, so an
  unsupported primitive or indexing form fails here rather than on the GPU machine."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415 - private, pinned jax
  h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
  x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

  def fwd_bwd(x, w, s):
    y, vjp = jax.vjp(lambda a, b: gmm(a, b, s, interpret=False), x, w)
    return y, vjp(y)

  hlo = jax.jit(fwd_bwd).trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernels: needs a CUDA GPU")
def test_gmm_compiles_on_gpu_and_matches_reference():
  """Default tilings at a mid-size bf16 shape: outputs and both gradients against the jnp loop."""
  rng = np.random.default_rng(0)
  sizes_np = rng.multinomial(4096, rng.dirichlet(np.full(8, 2.0))).astype(np.int32)
  sizes_np[3] = 0  # an empty expert
  sizes_np[0] += 4096 - sizes_np.sum()
  x, w, ct = random_inputs(m=4096, k=512, n=768, e=8, dtype=jnp.bfloat16, seed=5)
  ct = ct.astype(jnp.bfloat16)
  sizes = jnp.asarray(sizes_np)
  f = lambda x, w: gmm(x, w, sizes)
  r = lambda x, w: reference.gmm(x, w, sizes)
  y, vjp = jax.vjp(jax.jit(f), x, w)
  y_ref, vjp_ref = jax.vjp(r, x, w)
  assert rel_err(y, y_ref) < 1e-2
  for a, b in zip(vjp(ct), vjp_ref(ct)):
    assert rel_err(a, b) < 1e-2
