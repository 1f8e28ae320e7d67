"""AdamW with global-norm clipping and linear warm-up then cosine decay to `min_lr` (EfficientLLM recipe)."""

from __future__ import annotations

import jax
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


def make_optimizer(cfg) -> optax.GradientTransformation:
  t = cfg.train
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm else optax.identity(),
      optax.adamw(schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
