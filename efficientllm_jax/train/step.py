"""Train state, initialisation, and the jitted train / eval steps (pure functions of pytrees).

The model is split once into a static graphdef and a Param pytree; steps merge them inside jit, so the loop
handles only arrays. Batches are {"inputs", "targets"} int32 [grad_accum, micro_batch, T]; gradient
accumulation scans over the leading axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from efficientllm_jax.models.transformer import Transformer
from efficientllm_jax.train.loss import cross_entropy
from efficientllm_jax.train.optimizer import make_optimizer, schedule


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # uint32 key data from train.seed, checkpointed with the rest; a stochastic layer takes its step-t key as
  # fold_in(wrap_key_data(rng), step), so a resumed run draws the same numbers as an uninterrupted one.
  rng: Any = None


def init_state(cfg, tx: optax.GradientTransformation):
  """(graphdef, TrainState) with parameters created on device inside one jit (no host copy)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

  @jax.jit
  def init(seed):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(seed, 1)))

  return graphdef, init(jax.random.key(cfg.train.seed))


def loss_fn(params, graphdef, batch, cfg):
  """Mean token loss + aux losses; returns (total, metrics)."""
  model = nnx.merge(graphdef, params)
  h_btd, aux = model.hidden(batch["inputs"])
  loss_sum, count = cross_entropy(h_btd, model.embed.embedding[...], batch["targets"], chunk=cfg.train.loss_chunk)
  ce = loss_sum / count
  total = ce + sum((v for k, v in aux.items() if k.endswith("_loss")), jnp.zeros((), jnp.float32))
  return total, {"loss": ce, **aux}


def make_train_step(cfg, graphdef, tx):
  lr_fn = schedule(cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    def micro(carry, mb):
      (_, metrics), grads = grad_fn(state.params, graphdef, mb, cfg)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    accum = batch["inputs"].shape[0]
    if accum == 1:
      (_, metrics), grads = grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), cfg)
    else:
      zero_g = jax.tree.map(jnp.zeros_like, state.params)
      zero_m = jax.eval_shape(lambda: grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), cfg)[0][1])
      zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m)
      (grads, metrics), _ = jax.lax.scan(micro, (zero_g, zero_m), batch)
      grads, metrics = jax.tree.map(lambda g: g / accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(cfg, graphdef):
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    h_btd, _ = model.hidden(batch["inputs"])
    return cross_entropy(h_btd, model.embed.embedding[...], batch["targets"], chunk=cfg.train.loss_chunk)

  return jax.jit(eval_step)


def build(cfg):
  """(graphdef, state, train_step, eval_step) for a validated config."""
  tx = make_optimizer(cfg)
  graphdef, state = init_state(cfg, tx)
  return graphdef, state, make_train_step(cfg, graphdef, tx), make_eval_step(cfg, graphdef)
