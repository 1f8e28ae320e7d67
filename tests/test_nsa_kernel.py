"""NSA Pallas kernels (kernels/nsa, interpret mode on CPU) against their dense jnp references, outputs and
gradients, odd lengths; the NSA module with attention.nsa.impl=pallas against impl=reference; the config checks.
A GPU test (skipped on CPU) compares the compiled kernels with the references at T=8192 in bf16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.attention import nsa as nsa_config
from efficientllm_jax import config as config_lib
from efficientllm_jax.kernels.nsa import kernel, reference
from efficientllm_jax.models import remat
from efficientllm_jax.models.attention import ATTENTIONS, nsa
from efficientllm_jax.models.positional import PositionContext, RoPE

GEOM = dict(compress_block=16, compress_stride=8)  # l, d; selection block l' = 16, n = 4
SELECT, N_SEL = 16, 4
BLOCKS = kernel.Blocks(cmp_q=16, cmp_k=16, slc_q=16, interpret=True)


def run_fast(f, *args):
  """jit + compile at XLA's cheapest backend optimisation: interpret-mode kernels are compile-bound on CPU."""
  return jax.jit(f).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_selection(seed, b, kv, t, n, select_block):
  """Per (b, k, t): the current block plus up to n - 1 distinct earlier blocks, shuffled; -1 pads short rows."""
  rng = np.random.default_rng(seed)
  idx = -np.ones((b, kv, t, n), np.int32)
  for bi, ki, ti in np.ndindex(b, kv, t):
    cur = ti // select_block
    ids = [cur, *rng.permutation(cur)[:n - 1]]
    idx[bi, ki, ti, :len(ids)] = rng.permutation(ids)
  return jnp.asarray(idx)


def _inputs(t=101, b=1, h=4, kv=2, d=16, dtype=jnp.float32):
  nc = nsa.num_compressed(t, GEOM["compress_block"], GEOM["compress_stride"])
  q = normal(0, (b, t, h, d), dtype)
  kc, vc = normal(1, (b, nc, kv, d), dtype), normal(2, (b, nc, kv, d), dtype)
  ks, vs = normal(3, (b, t, kv, d), dtype), normal(4, (b, t, kv, d), dtype)
  return q, kc, vc, ks, vs


def _assert_close(a, b, atol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=atol)


# cmp_q 4: 4 tokens x Gp 2 = 8 rows, raised to 8 tokens (16 rows); chunk 2: a key tile's dk/dv over several
# work items (atomics), 512: one item per key tile (dkdv_items 1: no shrinking for this short T)
@pytest.mark.parametrize("cmp_q, chunk", [(16, 512), (4, 2)])
def test_compressed_attention_and_selection_scores_match_reference(cmp_q, chunk):
  q, kc, vc, _, _ = _inputs()
  cot = normal(9, q.shape)

  def run(mod, **kw):
    def loss(q, kc, vc):
      o, lse = mod.compressed_attention(q, kc, vc, **GEOM, **kw)
      return jnp.sum(o * cot), (o, lse)
    (_, (o, lse)), grads = run_fast(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, kc, vc)
    score = run_fast(lambda q, kc, lse: mod.selection_scores(q, kc, lse, select_block=SELECT, **GEOM, **kw),
                     q, kc, lse)
    return o, lse, score, grads

  o, lse, score, grads = run(kernel, blocks=dataclasses.replace(BLOCKS, cmp_q=cmp_q, cmp_chunk=chunk, dkdv_items=1))
  o_r, lse_r, score_r, grads_r = run(reference)
  _assert_close(o, o_r, 2e-5)
  early = np.isinf(np.asarray(lse_r))  # tokens before the first block ends see nothing: lse +inf, o and score 0
  assert early[..., :GEOM["compress_block"] - 1].all() and not early[..., GEOM["compress_block"] - 1:].any()
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), early)
  _assert_close(np.where(early, 0, lse), np.where(early, 0, lse_r), 2e-5)
  assert score.shape == score_r.shape == (1, 2, 101, 7)
  _assert_close(score, score_r, 2e-5)
  for g, g_r in zip(grads, grads_r):
    _assert_close(g, g_r, 5e-5)


@pytest.mark.parametrize("slc_q, chunk", [(16, 32), (4, 1)])  # as above; chunk 1: one query tile per item
def test_selected_attention_matches_reference_values_and_gradients(slc_q, chunk):
  q, _, _, ks, vs = _inputs()
  idx = random_selection(5, 1, 2, q.shape[1], N_SEL, SELECT)
  cot = normal(9, q.shape)

  def run(mod, **kw):
    def loss(q, k, v):
      o = mod.selected_attention(q, k, v, idx, select_block=SELECT, **kw)
      return jnp.sum(o * cot), o
    (_, o), grads = run_fast(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, ks, vs)
    return o, grads

  o, grads = run(kernel, blocks=dataclasses.replace(BLOCKS, slc_q=slc_q, slc_chunk=chunk, dkdv_items=1))
  o_r, grads_r = run(reference)
  _assert_close(o, o_r, 2e-5)
  for g, g_r in zip(grads, grads_r):
    _assert_close(g, g_r, 5e-5)


@pytest.mark.parametrize("n_sel, local, zero_q", [(3, 0, True), (9, 2, False)])
def test_select_top_equals_select_blocks_over_the_scores(n_sel, local, zero_q):
  """The fused top-n kernel picks the ids nsa.select_blocks picks from selection_scores: forced first / local
  blocks, no future block, ties to the lower id (zero_q: uniform probabilities, many exact ties; local 0: blocks
  with score 0), -1 where fewer than n blocks are visible (n 9 > the 7 blocks of T=101)."""
  q, kc, _, _, _ = _inputs()
  q = jnp.zeros_like(q) if zero_q else q
  _, lse = run_fast(lambda q, kc: reference.compressed_attention(q, kc, kc, **GEOM), q, kc)
  kw = dict(select_block=SELECT, **GEOM, blocks=BLOCKS)
  ids = run_fast(lambda q, kc, lse: kernel.select_top(q, kc, lse, num_selected=n_sel, local_blocks=local, **kw),
                 q, kc, lse)
  score = run_fast(lambda q, kc, lse: kernel.selection_scores(q, kc, lse, **kw), q, kc, lse)
  want = nsa.select_blocks(score, jnp.arange(q.shape[1]), select_block=SELECT, num_selected=n_sel,
                           local_blocks=local)
  assert ids.shape == want.shape == (1, 2, 101, min(n_sel, 7))
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want))
  assert (np.asarray(ids) == -1).any() == (n_sel > 1)  # early tokens see fewer than n blocks


def test_work_items_cut_each_key_tiles_list_into_chunks():
  cnt = np.array([[[5, 0, 1, 7], [0, 0, 0, 2]]], np.int32)  # [B=1, K=2, nK=4]
  items = np.asarray(kernel.work_items(jnp.asarray(cnt), 3, 6))
  want = [[(0, 0, 3), (0, 3, 5), (2, 0, 1), (3, 0, 3), (3, 3, 6), (3, 6, 7)],
          [(3, 0, 2)] + [(-1,)] * 5]
  for k in range(2):
    got = [tuple(r[:3]) if r[0] >= 0 else (-1,) for r in items[0, k]]
    assert got == want[k], (k, got)
  # chunk shrinks when a (batch, kv head) has few (query tile, key tile) pairs: 64K cmp keeps 128, 8K gets 3
  assert [kernel.item_chunk(p, 128, 1024) for p in (135_000, 2_500, 10)] == [128, 3, 1]


def test_remap_matrices_reproduce_the_papers_selection_weights():
  """wa / wb tiled along the diagonal equal nsa.selection_weights (overlap of compressed and selection blocks)."""
  l, d, ls, bk, t = 64, 32, 64, 64, 64 * 32 * 3
  wa, wb = kernel.remap_matrices(compress_block=l, compress_stride=d, select_block=ls, bk=bk)
  w = nsa.selection_weights(t, l, d, ls)
  bs = wa.shape[1]
  for jt in range(w.shape[0] // bk):
    np.testing.assert_array_equal(w[jt * bk:(jt + 1) * bk, jt * bs:(jt + 1) * bs], wa)
    if (jt + 1) * bs < w.shape[1]:
      np.testing.assert_array_equal(w[jt * bk:(jt + 1) * bk, (jt + 1) * bs:(jt + 2) * bs], wb)


# ---------------------------------------------------------------------------------------------------------------
# the module

def test_nsa_module_pallas_equals_reference_in_values_and_gradients():
  t = 101  # odd: partial compression, selection and query tiles
  cfgs = {}
  for impl in ("reference", "pallas"):
    cfg = nsa_config.get_config("tiny")
    cfg.attention.impl, cfg.attention.nsa.impl, cfg.data.seq_len = "xla", impl, t
    cfgs[impl] = config_lib.validate(cfg)
  module = ATTENTIONS["nsa"](cfgs["reference"], rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)
  x = normal(100, (1, t, cfgs["reference"].model.hidden))
  ctx = RoPE(cfgs["reference"], rngs=nnx.Rngs(0)).context(jnp.arange(t)[None])
  cot = normal(101, (1, t, cfgs["reference"].model.hidden))

  def run(impl):
    def loss(state, x):
      m = nnx.merge(graphdef, state)
      m.kernel_impl = impl
      outs, gates, idx = m.branches(x, ctx)  # what m(x, ctx) computes, keeping the branches and ids
      y = m.o(sum(gates[..., i:i + 1] * outs[name] for i, name in enumerate(nsa.BRANCHES)))
      return jnp.sum(y * cot), (outs, idx)
    return run_fast(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), state, x)

  (v_p, (outs_p, idx_p)), (gs_p, gx_p) = run("pallas")
  (v_r, (outs_r, idx_r)), (gs_r, gx_r) = run("reference")
  np.testing.assert_array_equal(np.asarray(idx_p), np.asarray(idx_r))
  for name in nsa.BRANCHES:
    _assert_close(outs_p[name], outs_r[name], 2e-5)
  _assert_close(v_p, v_r, 1e-4)
  _assert_close(gx_p, gx_r, 1e-4)
  for a, b in zip(jax.tree.leaves(gs_p), jax.tree.leaves(gs_r)):
    _assert_close(a, b, 1e-4)


def test_nsa_kernels_keep_their_residuals_under_the_default_remat():
  """Under remat dots_attention the pallas path's outputs and residuals carry the attention_residuals name, so the
  backward does not run the sparse forward again (on an H200, NSA 0.5B 350.5 -> 340.2 ms a step). Values and
  gradients through keep_residuals are tested in test_remat.py."""
  cfg = nsa_config.get_config("tiny")
  cfg.attention.impl, cfg.attention.nsa.impl, cfg.data.seq_len = "xla", "pallas", 64  # xla window: no name
  module = ATTENTIONS["nsa"](config_lib.validate(cfg), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)
  x = normal(3, (1, 64, cfg.model.hidden))
  loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, PositionContext()) ** 2)  # noqa: E731
  kept = jax.checkpoint(loss, policy=remat.POLICIES["dots_attention"])
  assert remat.ATTENTION_RESIDUALS in str(jax.make_jaxpr(jax.grad(kept))(state, x))


def test_nsa_pallas_refuses_a_logit_bias():
  c = nsa_config.get_config("0.5B")
  c.attention.nsa.impl, c.position.kind = "pallas", "alibi"
  with pytest.raises(config_lib.ConfigError, match="attention.nsa.impl=pallas takes no logit bias"):
    config_lib.validate(c)


@pytest.mark.parametrize("backend,changes,want", [
    ("cpu", {}, "reference"),
    ("gpu", {}, "pallas"),
    ("gpu", {"position.kind": "alibi"}, "reference"),  # the kernels take no logit bias
    ("gpu", {"attention.nsa.select_block": 48}, "reference"),  # Triton tiles need powers of two
    ("cpu", {"attention.nsa.impl": "pallas"}, "pallas"),  # explicit choices stand
    ("gpu", {"attention.nsa.impl": "reference"}, "reference"),
])
def test_nsa_impl_auto_picks_kernels_on_gpu_when_geometry_fits(monkeypatch, backend, changes, want):
  c = nsa_config.get_config("0.5B")
  assert c.attention.nsa.impl == "auto"
  for key, value in changes.items():
    section, name = key.rsplit(".", 1)
    node = c
    for part in section.split("."):
      node = node[part]
    node[name] = value
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert nsa.resolve_impl(c) == want


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled Triton kernels vs the references at the EfficientLLM geometry, bf16

@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Pallas Triton lowering)")
def test_kernels_on_gpu_at_8k_match_reference_in_bf16():
  b, t, h, kv, d = 1, 8192, 12, 2, 128
  l, s, ls, n = 64, 32, 64, 4
  geom = dict(compress_block=l, compress_stride=s)
  nc = nsa.num_compressed(t, l, s)
  bf = jnp.bfloat16
  q = normal(0, (b, t, h, d), bf)
  kc, vc = normal(1, (b, nc, kv, d), bf), normal(2, (b, nc, kv, d), bf)
  ks, vs = normal(3, (b, t, kv, d), bf), normal(4, (b, t, kv, d), bf)
  cot = normal(9, q.shape, bf)
  blocks = kernel.Blocks()

  def cmp(mod, **kw):
    loss = lambda q, kc, vc: jnp.sum(mod.compressed_attention(q, kc, vc, **geom, **kw)[0].astype(jnp.float32) * cot)
    o, lse = jax.jit(lambda q, kc, vc: mod.compressed_attention(q, kc, vc, **geom, **kw))(q, kc, vc)
    score = jax.jit(lambda q, kc, lse: mod.selection_scores(q, kc, lse, select_block=ls, **geom, **kw))(q, kc, lse)
    return o, lse, score, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kc, vc)

  o, lse, score, grads = cmp(kernel, blocks=blocks)
  o_r, lse_r, score_r, grads_r = cmp(reference)
  _assert_close(o, o_r, 2e-2)
  finite = np.isfinite(np.asarray(lse_r))
  _assert_close(np.where(finite, lse, 0), np.where(finite, lse_r, 0), 2e-3)
  _assert_close(score, score_r, 1e-3)
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_r, np.float32), atol=5e-2 * float(
        jnp.abs(g_r.astype(jnp.float32)).max()))

  # the selected branch with the ids NSA would pick from these scores, same ids for kernel and reference
  pick = jax.jit(lambda sc: nsa.select_blocks(sc, jnp.arange(t), select_block=ls, num_selected=n, local_blocks=2))
  idx = pick(score_r)
  top = jax.jit(lambda q, kc, lse: kernel.select_top(q, kc, lse, select_block=ls, num_selected=n, local_blocks=2,
                                                      **geom, blocks=blocks))(q, kc, lse)
  np.testing.assert_array_equal(np.asarray(top), np.asarray(pick(score)))  # fused top-n = top-k of its scores

  half = t // 4  # the dense [T, T] reference would not fit; compare on the first quarter (selection is causal)

  def slc(mod, q, ks, vs, **kw):
    f = lambda q, ks, vs: mod.selected_attention(q, ks, vs, idx[:, :, :half], select_block=ls, **kw)
    loss = lambda q, ks, vs: jnp.sum(f(q, ks, vs).astype(jnp.float32) * cot[:, :half])  # the compared quarter
    return jax.jit(f)(q, ks, vs), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, ks, vs)

  o, grads = slc(kernel, q[:, :half], ks[:, :half], vs[:, :half], blocks=blocks)
  o_r, grads_r = slc(reference, q[:, :half], ks[:, :half], vs[:, :half])
  _assert_close(o, o_r, 2e-2)
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_r, np.float32), atol=5e-2 * float(
        jnp.abs(g_r.astype(jnp.float32)).max()))


# ---------------------------------------------------------------------------------------------------------------
# Triton lowering for an H100 (no GPU needed) at a small EfficientLLM geometry, default Blocks

def test_kernels_lower_to_triton_for_h100(triton_h100):
  """T = 1024, l = 64, d = 32, l' = 64, n = 4, 12/2 heads (G = 6 padded to 8 rows), head dim 128, bf16:
  compressed fwd + dq + dkdv, selection scores, selected fwd + dq + dkdv each lower through Pallas' Triton path."""
  b, t, h, kv, d = 1, 1024, 12, 2, 128
  l, s, ls, n = 64, 32, 64, 4
  nc = nsa.num_compressed(t, l, s)
  blocks = kernel.Blocks(interpret=False)
  geom = dict(compress_block=l, compress_stride=s, blocks=blocks)
  sds = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  lower = lambda f, *args: triton_h100(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())  # noqa: E731

  def cmp_fwd_bwd(q, kc, vc):
    o, vjp = jax.vjp(lambda q, kc, vc: kernel.compressed_attention(q, kc, vc, **geom)[0], q, kc, vc)
    return o, vjp(o)

  def scores(q, kc, lse):
    return kernel.selection_scores(q, kc, lse, select_block=ls, **geom)

  def top(q, kc, lse):
    return kernel.select_top(q, kc, lse, select_block=ls, num_selected=n, local_blocks=2, **geom)

  def slc_fwd_bwd(q, ks, vs, idx):
    o, vjp = jax.vjp(lambda q, ks, vs: kernel.selected_attention(q, ks, vs, idx, select_block=ls, blocks=blocks),
                     q, ks, vs)
    return o, vjp(o)

  assert lower(cmp_fwd_bwd, sds(b, t, h, d), sds(b, nc, kv, d), sds(b, nc, kv, d)) == 3
  assert lower(scores, sds(b, t, h, d), sds(b, nc, kv, d), sds(b, kv, h // kv, t, dtype=jnp.float32)) == 1
  assert lower(top, sds(b, t, h, d), sds(b, nc, kv, d), sds(b, kv, h // kv, t, dtype=jnp.float32)) == 1
  idx = sds(b, kv, t, n, dtype=jnp.int32)
  assert lower(slc_fwd_bwd, sds(b, t, h, d), sds(b, t, kv, d), sds(b, t, kv, d), idx) == 3
