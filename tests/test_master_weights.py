"""train.master_weights: bf16 parameters with an fp32 copy in the optimizer state (train/optimizer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientllm_jax.train import optimizer, step as step_lib
from tests.conftest import tiny_config


def test_wrapper_runs_the_inner_optimizer_on_the_fp32_copy():
  """Against the inner optimizer run by hand on fp32 values: the copy is updated exactly as an fp32 parameter
  would be, and the parameters become the copy rounded."""
  key = jax.random.key(0)
  p32 = {"w": jax.random.normal(key, (8, 16)), "b": jnp.linspace(-1.0, 1.0, 16)}
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  inner = optax.adamw(1e-3, weight_decay=0.1)
  tx = optimizer.with_master_weights(inner)
  state = tx.init(params)
  ref_p = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # the copy starts as the bf16 values
  ref_s = inner.init(ref_p)
  for i in range(3):
    grads = jax.tree.map(lambda x: (jnp.sin(x.astype(jnp.float32) * (i + 1)) * 1e-2).astype(jnp.bfloat16), params)
    updates, state = tx.update(grads, state, params)
    params = optimizer.apply_updates(params, updates, state)
    ref_u, ref_s = inner.update(jax.tree.map(lambda g: g.astype(jnp.float32), grads), ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, ref_u)
  for k in p32:
    assert state.master[k].dtype == jnp.float32 and params[k].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.master[k]), np.asarray(ref_p[k]))
    np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(ref_p[k].astype(jnp.bfloat16)))


def _batch(accum, micro):
  tokens = np.random.default_rng(0).integers(0, 512, size=(accum * micro, 65)).astype(np.int32)
  return {"inputs": tokens[:, :-1].reshape(accum, micro, 64), "targets": tokens[:, 1:].reshape(accum, micro, 64)}


SMALL_LR = {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "train.warmup_steps": 0,
            "train.lr": 1e-6, "train.min_lr": 1e-6}


def test_small_updates_reach_the_parameters_only_through_the_master_copy():
  """lr 1e-6 against weights of ~0.02 (a bf16 step there is ~1e-4): plain bf16 parameters keep almost every
  weight matrix entry unchanged, whatever the gradient; the master copy moves by ~lr per step, and the bf16
  parameters, rounded from it, follow it wherever it crosses a rounding boundary."""
  batch = _batch(1, 4)
  moved = {}
  for master in (False, True):
    built = step_lib.build(tiny_config(**SMALL_LR, **{"train.master_weights": master}))
    state, p0 = built.state, jax.device_get(built.state.params)
    m0 = jax.device_get(optimizer.master_of(state.opt_state))
    for _ in range(3):
      state, _ = built.train_step(state, batch)
    w0 = p0["blocks"]["ffn"]["up"]["kernel"][...]
    w = jax.device_get(state.params)["blocks"]["ffn"]["up"]["kernel"][...]
    moved[master] = float(np.mean(np.asarray(w, np.float32) != np.asarray(w0, np.float32)))
    if master:
      m = jax.device_get(optimizer.master_of(state.opt_state))["blocks"]["ffn"]["up"]["kernel"][...]
      step = np.abs(np.asarray(m) - np.asarray(m0["blocks"]["ffn"]["up"]["kernel"][...]))
      assert 2e-6 < float(np.median(step)) < 4e-6  # 3 Adam steps of ~lr each, kept in fp32
      np.testing.assert_array_equal(np.asarray(w), np.asarray(m.astype(jnp.bfloat16)))
  assert moved[False] < 0.03  # only entries within ~1e-4 of zero, where a bf16 step is small enough (1.9 % here)
  assert moved[True] > 3 * moved[False]  # 10 % here: the copy crossed a rounding boundary


def test_step_matches_adamw_on_the_master_copy_with_accumulated_fp32_gradients():
  """One step with grad_accum 2 against a reference built from the pieces: the bf16 model's gradients of each
  micro-batch (jax.grad), summed in fp32 and averaged, then the configured clip + AdamW applied to the fp32 copy.
  AdamW's eps is 1 here: its first step is otherwise lr * sign(g), which flips on the last bit of a tiny gradient
  (the reference's gradients are compiled separately); with eps 1 the update is ~lr * g, smooth in g."""
  cfg = tiny_config(**{"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "train.master_weights": True,
                       "train.micro_batch": 2, "train.grad_accum": 2, "train.warmup_steps": 0, "train.eps": 1.0})
  built = step_lib.build(cfg)
  batch = _batch(2, 2)
  params = built.state.params
  master = optimizer.master_of(built.state.opt_state)
  grad = jax.jit(jax.grad(lambda p, mb: step_lib.loss_fn(p, built.graphdef, mb, cfg)[0]))
  g = [grad(params, jax.tree.map(lambda x, i=i: x[i], batch)) for i in range(2)]
  g = jax.tree.map(lambda a, b: (a.astype(jnp.float32) + b.astype(jnp.float32)) / 2, *g)
  inner = optax.chain(optax.clip_by_global_norm(cfg.train.clip_norm),
                      optax.adamw(optimizer.schedule(cfg), b1=cfg.train.b1, b2=cfg.train.b2, eps=cfg.train.eps,
                                  weight_decay=cfg.train.weight_decay, mask=optimizer.decay_mask))
  ref_u, _ = inner.update(g, inner.init(master), master)
  ref = jax.device_get(optax.apply_updates(master, ref_u))
  state, _ = built.train_step(built.state, batch)
  got = jax.device_get(optimizer.master_of(state.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-7), got, ref)
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(p.dtype))),
               jax.device_get(state.params), got)


def test_with_params_resets_the_copy_and_leaves_other_states_alone():
  p = {"w": jnp.ones((4,), jnp.bfloat16)}
  tx = optimizer.with_master_weights(optax.sgd(0.1))
  state = optimizer.with_params(tx.init(p), {"w": jnp.full((4,), 3.0, jnp.bfloat16)})
  assert state.master["w"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(state.master["w"]), np.full((4,), 3.0, np.float32))
  plain = optax.sgd(0.1).init(p)
  assert optimizer.with_params(plain, p) is plain
  assert optimizer.master_of(plain) is None


def test_one_seed_gives_one_model_in_every_parameter_dtype():
  """Initial weights are drawn in fp32 and rounded: bf16 parameters are the fp32 run's rounded, and the master copy
  is the fp32 run's draws themselves (the MoE router stays fp32 in every dtype)."""
  ref = jax.device_get(step_lib.build(tiny_config(**{"ffn.kind": "moe"})).state.params)
  built = step_lib.build(tiny_config(**{"ffn.kind": "moe", "model.param_dtype": "bfloat16",
                                        "train.master_weights": True}))
  params, master = jax.device_get((built.state.params, optimizer.master_of(built.state.opt_state)))
  dtypes = set()
  for r, p, m in zip(jax.tree.leaves(ref), jax.tree.leaves(params), jax.tree.leaves(master)):
    dtypes.add(str(p.dtype))
    np.testing.assert_array_equal(np.asarray(p), np.asarray(r).astype(p.dtype))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(r))
  assert dtypes == {"bfloat16", "float32"}  # the router's kernel stays fp32
