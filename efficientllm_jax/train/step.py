"""Train state, initialisation, and the jitted train / eval steps (pure functions of pytrees).

The model is split once into a static graphdef and a Param pytree; steps merge them inside jit, so the loop
handles only arrays. Batches are {"inputs", "targets"} int32 [grad_accum, micro_batch, T]; gradient
accumulation scans over the leading axis. Everything is compiled for a mesh (one device is a 1x1x1x1 mesh):
the state is created sharded by the logical-axis rules (never whole on one device), steps take and return
it with those shardings and donate the old state.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from efficientllm_jax.models.transformer import Transformer
from efficientllm_jax.parallel import sharding as sh
from efficientllm_jax.train.loss import cross_entropy
from efficientllm_jax.train import optimizer as opt_lib


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # uint32 key data from train.seed, checkpointed with the rest; a stochastic layer takes its step-t key as
  # fold_in(wrap_key_data(rng), step), so a resumed run draws the same numbers as an uninterrupted one.
  rng: Any = None


def state_shardings(cfg, tx, mesh):
  """(graphdef, TrainState of NamedShardings, abstract params) from abstract init: nothing is allocated."""
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  rules = sh.rules_of(cfg)
  params_sh = sh.param_shardings(abstract_params, mesh, rules)
  params_sh = jax.tree.map(lambda v: v.value if isinstance(v, nnx.Variable) else v, params_sh,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = sh.like_params(abstract_opt, jax.tree.structure(abstract_params), params_sh, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return graphdef, TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated), abstract_params


def _fp32_params(cfg):
  """`cfg` with model.param_dtype float32 (a copy when it differs)."""
  if cfg.model.param_dtype == "float32":
    return cfg
  c = copy.deepcopy(cfg)
  c.model.param_dtype = "float32"
  return c


def init_state(cfg, tx: optax.GradientTransformation, mesh):
  """(graphdef, TrainState, shardings): parameters created sharded inside one jit (no host copy).

  The initial weights are drawn in fp32 whatever model.param_dtype says, then rounded: one seed gives the same
  model in every parameter dtype, and under train.master_weights the fp32 copy starts from the draws themselves."""
  graphdef, shardings, abstract = state_shardings(cfg, tx, mesh)

  def init(key):
    params32 = nnx.state(Transformer(_fp32_params(cfg), rngs=nnx.Rngs(key)), nnx.Param)
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params32, abstract)
    opt_state = tx.init(params32 if cfg.train.master_weights else params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  init = jax.jit(init, out_shardings=shardings, compiler_options=run_once_options())
  state = init(jax.random.key(cfg.train.seed))
  return graphdef, state, shardings


def run_once_options() -> dict | None:
  """XLA options for programs that run once or a few times (init, eval): on CPU, where LLVM's optimisation of a
  whole model's random init or forward costs seconds of compile for milliseconds of run time, compile them with
  the cheapest backend optimisation. The train step keeps full optimisation (its step time is what is measured);
  other backends keep their defaults."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def loss_fn(params, graphdef, batch, cfg):
  """Mean token loss + aux losses; returns (total, metrics)."""
  model = nnx.merge(graphdef, params)
  h_btd, aux = model.hidden(batch["inputs"])
  loss_sum, count = cross_entropy(h_btd, model.embed.embedding[...], batch["targets"], chunk=cfg.train.loss_chunk,
                                  logits_dtype=cfg.train.logits_dtype, impl=cfg.train.loss_impl)
  ce = loss_sum / count
  total = ce + sum((v for k, v in aux.items() if k.endswith("_loss")), jnp.zeros((), jnp.float32))
  return total, {"loss": ce, **aux}


def _in_mesh(fn, cfg, mesh):
  """Trace `fn` with activation constraints on `mesh`."""
  rules = sh.rules_of(cfg)

  @functools.wraps(fn)  # keeps the name (train_step / eval_step) that compile-time listeners report
  def wrapped(*args):
    with sh.activation_sharding(mesh, rules):
      return fn(*args)

  return wrapped


def batch_sharding(cfg, mesh):
  shape = (cfg.train.grad_accum, cfg.train.micro_batch, cfg.data.seq_len)
  return sh.batch_sharding(mesh, sh.rules_of(cfg), shape)


def make_train_step(cfg, graphdef, tx, mesh, shardings):
  lr_fn = opt_lib.schedule(cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    def micro(carry, mb):
      (_, metrics), grads = grad_fn(state.params, graphdef, mb, cfg)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    accum = batch["inputs"].shape[0]
    if accum == 1:
      (_, metrics), grads = grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), cfg)
    else:
      # Under train.master_weights the micro-batches' bf16 gradients are summed in the master dtype.
      master = opt_lib.master_of(state.opt_state)
      zero_g = jax.tree.map(jnp.zeros_like, state.params if master is None else master)
      zero_m = jax.eval_shape(lambda: grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), cfg)[0][1])
      zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m)
      (grads, metrics), _ = jax.lax.scan(micro, (zero_g, zero_m), batch)
      grads, metrics = jax.tree.map(lambda g: g / accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = opt_lib.apply_updates(state.params, updates, opt_state)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sh = batch_sharding(cfg, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(_in_mesh(train_step, cfg, mesh), in_shardings=(shardings, {"inputs": batch_sh, "targets": batch_sh}),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(cfg, graphdef, mesh, shardings):
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    h_btd, _ = model.hidden(batch["inputs"])
    return cross_entropy(h_btd, model.embed.embedding[...], batch["targets"], chunk=cfg.train.loss_chunk,
                         logits_dtype=cfg.train.logits_dtype, impl=cfg.train.loss_impl)

  micro_sh = eval_batch_sharding(cfg, mesh)
  return jax.jit(_in_mesh(eval_step, cfg, mesh), in_shardings=(shardings.params, {"inputs": micro_sh,
                                                                                "targets": micro_sh}),
                 compiler_options=run_once_options())


def eval_batch_sharding(cfg, mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*batch_sharding(cfg, mesh).spec[1:]))


def global_batch(local: dict, sharding) -> dict:
  """This process's rows of a batch -> global jax.Arrays on `sharding` (the multi-host batch assembly).

  Each process feeds only its own shard of the data (pipeline.train_iterator / eval_batches); rows are laid out in
  process order along the batch axis. With one process this is a plain sharded device_put."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


class Built(NamedTuple):
  graphdef: Any
  state: TrainState
  train_step: Any
  eval_step: Any
  mesh: jax.sharding.Mesh
  shardings: TrainState  # NamedShardings of the state (for checkpoint restore)
  train_batch_sharding: Any  # [grad_accum, micro_batch, T]: global_batch(local, this) feeds train_step
  eval_batch_sharding: Any  # [micro_batch, T]: global_batch(local, this) feeds eval_step


def build(cfg, mesh=None) -> Built:
  """Everything a run needs for a validated config, on `mesh` (default: from config.mesh over all devices)."""
  mesh = mesh if mesh is not None else sh.make_mesh(cfg)
  tx = opt_lib.make_optimizer(cfg)
  graphdef, state, shardings = init_state(cfg, tx, mesh)
  return Built(graphdef, state, make_train_step(cfg, graphdef, tx, mesh, shardings),
               make_eval_step(cfg, graphdef, mesh, shardings), mesh, shardings,
               batch_sharding(cfg, mesh), eval_batch_sharding(cfg, mesh))
