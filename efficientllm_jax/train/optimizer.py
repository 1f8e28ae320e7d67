"""AdamW with global-norm clipping and linear warm-up then cosine decay to `min_lr` (EfficientLLM recipe).

`train.master_weights`: with `model.param_dtype=bfloat16` the model's parameters are bf16 (the forward and backward
read them as they are, no casts, and the gradients are bf16), while the optimizer keeps an fp32 copy of them (the
master weights) in its state, runs AdamW on that copy with the gradients cast to fp32, and the step writes the new
bf16 parameters as the rounded master. Without it, bf16 parameters are updated in bf16 (as the transformers peer
does): an update smaller than half a bf16 step of the weight (2^-9 of it) is lost.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def schedule(cfg) -> optax.Schedule:
  t = cfg.train
  warmup = min(int(t.warmup_steps), max(int(t.steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup, decay_steps=max(int(t.steps), warmup + 1),
      end_value=t.min_lr)


NO_DECAY = ("bias", "scale")


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", getattr(last, "idx", last))))


def decay_mask(params):
  """Weight decay on weight matrices and embeddings; biases and norm scales are not decayed (Megatron's
  convention). Decided by parameter name, since stacked layers make every leaf at least 2-D."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in NO_DECAY, params)


class MasterWeightsState(NamedTuple):
  master: Any  # the parameters in the master dtype (fp32), what the inner optimizer updates
  inner: optax.OptState  # the inner optimizer's state, built on `master`


def with_master_weights(inner: optax.GradientTransformation, dtype=jnp.float32) -> optax.GradientTransformation:
  """`inner` run on a `dtype` copy of the parameters kept in the state. `update` casts the gradients to `dtype`,
  updates the copy and returns the updates of the copy; `apply_updates` below then sets the parameters to the
  copy rounded to their own dtype (not `params + updates`, which would round every step's update away)."""

  def init(params):
    master = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    return MasterWeightsState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    del params  # the inner optimizer sees the master copy, never the rounded parameters
    grads = jax.tree.map(lambda g: g.astype(dtype), grads)
    updates, inner_state = inner.update(grads, state.inner, state.master)
    return updates, MasterWeightsState(master=optax.apply_updates(state.master, updates), inner=inner_state)

  return optax.GradientTransformation(init, update)


def master_of(opt_state) -> Any | None:
  """The master copy held in `opt_state` (None without train.master_weights)."""
  return opt_state.master if isinstance(opt_state, MasterWeightsState) else None


def apply_updates(params, updates, opt_state):
  """The next parameters: the new master rounded to the parameters' dtypes under train.master_weights, else
  optax.apply_updates (`opt_state` is the state `update` returned)."""
  master = master_of(opt_state)
  if master is None:
    return optax.apply_updates(params, updates)
  return jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)


def with_params(opt_state, params):
  """`opt_state` with its master copy replaced by `params` (initial weights loaded after init); other states are
  returned as they are."""
  if not isinstance(opt_state, MasterWeightsState):
    return opt_state
  return opt_state._replace(master=jax.tree.map(lambda m, p: jnp.asarray(p, m.dtype), opt_state.master, params))


def make_optimizer(cfg) -> optax.GradientTransformation:
  t = cfg.train
  tx = optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm else optax.identity(),
      optax.adamw(schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
  return with_master_weights(tx) if t.master_weights else tx
