"""Config schema helpers and `validate(config)`: one clear ConfigError per user mistake, before anything compiles.

Each message names the offending key, its value, and the fix, on one line.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

ATTENTION_KINDS = ("mha", "gqa", "mqa")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
POSITION_KINDS = ("rope", "none")
FFN_KINDS = ("dense",)
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZERS = ("bpe", "bytes")
DATA_SOURCES = ("embedded", "arrayrecord")


class ConfigError(ValueError):
  """A user mistake in the config; str(err) is the one line to show."""


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"{key} is missing: start from configs/base.py's get_config() or add it")
    node = node[part]
  return node


def _positive_int(config, key: str) -> int:
  v = _get(config, key)
  if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
    raise ConfigError(f"{key}={v!r} must be a positive integer: set --config.{key}=N with N >= 1")
  return v


def _non_negative(config, key: str) -> float:
  v = _get(config, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
    raise ConfigError(f"{key}={v!r} must be a number >= 0: set --config.{key} to a non-negative value")
  return v


def _one_of(config, key: str, allowed: tuple[str, ...]) -> str:
  v = _get(config, key)
  if v not in allowed:
    raise ConfigError(f"{key}={v!r} is not known: use one of {', '.join(allowed)}")
  return v


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_model(c) -> None:
  for key in ("model.vocab_size", "model.hidden", "model.num_layers", "model.num_heads", "model.num_kv_heads",
              "model.head_dim", "model.ffn_dim"):
    _positive_int(c, key)
  h, kv = c.model.num_heads, c.model.num_kv_heads
  if h % kv:
    raise ConfigError(f"model.num_heads={h} is not divisible by model.num_kv_heads={kv}: "
                      f"set model.num_kv_heads to a divisor of {h} ({_divisors(h)})")
  _one_of(c, "model.param_dtype", DTYPES)
  _one_of(c, "model.dtype", DTYPES)
  _one_of(c, "model.remat", REMAT_POLICIES)
  if _non_negative(c, "model.rms_eps") == 0:
    raise ConfigError("model.rms_eps=0 divides by zero on an all-zero row: use a small positive value such as 1e-6")


def validate_attention(c) -> None:
  kind = _one_of(c, "attention.kind", ATTENTION_KINDS)
  _one_of(c, "attention.impl", ATTENTION_IMPLS)
  _non_negative(c, "attention.window")
  h, kv = c.model.num_heads, c.model.num_kv_heads
  if kind == "mqa" and kv != 1:
    raise ConfigError(f"attention.kind='mqa' needs model.num_kv_heads=1 (got {kv}): "
                      "use configs/attention/mqa.py or set --config.model.num_kv_heads=1")
  if kind == "mha" and kv != h:
    raise ConfigError(f"attention.kind='mha' needs model.num_kv_heads == model.num_heads={h} (got {kv}): "
                      f"set --config.model.num_kv_heads={h}")


def validate_position(c) -> None:
  kind = _one_of(c, "position.kind", POSITION_KINDS)
  if kind == "rope":
    if _non_negative(c, "position.rope_theta") == 0:
      raise ConfigError("position.rope_theta=0 is not a valid base: use a positive base such as 1e6 (Qwen2.5)")
    frac = _non_negative(c, "position.rope_fraction")
    rot = int(round(c.model.head_dim * frac))
    if not 0 < frac <= 1 or rot % 2:
      raise ConfigError(f"position.rope_fraction={frac} rotates {rot} of model.head_dim={c.model.head_dim} dims: "
                        "choose a fraction in (0, 1] that gives an even number of rotated dims")


def validate_ffn(c) -> None:
  _one_of(c, "ffn.kind", FFN_KINDS)


def validate_data(c) -> None:
  source = _one_of(c, "data.source", DATA_SOURCES)
  _positive_int(c, "data.seq_len")
  if source == "arrayrecord":
    validate_arrayrecord(c)
    return
  tok = _one_of(c, "data.tokenizer", TOKENIZERS)
  if tok == "bpe":
    v = _positive_int(c, "data.bpe_vocab_size")
    if v < 260:
      raise ConfigError(f"data.bpe_vocab_size={v} is below the 256 byte symbols plus specials: use at least 260")
    if v > c.model.vocab_size:
      raise ConfigError(f"data.bpe_vocab_size={v} exceeds model.vocab_size={c.model.vocab_size}: "
                        f"lower data.bpe_vocab_size or raise model.vocab_size to >= {v}")
  elif c.model.vocab_size < 258:
    raise ConfigError(f"model.vocab_size={c.model.vocab_size} cannot hold the byte tokenizer's 258 ids: use >= 258")
  frac = _non_negative(c, "data.eval_fraction")
  if not 0 < frac < 1:
    raise ConfigError(f"data.eval_fraction={frac} must be in (0, 1): a held-out split is needed for eval/PPL")
  _non_negative(c, "data.max_corpus_mb")


def validate_train(c) -> None:
  for key in ("train.steps", "train.micro_batch", "train.grad_accum", "train.log_every", "train.eval_batches"):
    _positive_int(c, key)
  for key in ("train.warmup_steps", "train.eval_every", "train.weight_decay", "train.clip_norm", "train.eps",
              "train.loss_chunk"):
    _non_negative(c, key)
  lr, min_lr = _non_negative(c, "train.lr"), _non_negative(c, "train.min_lr")
  if lr == 0:
    raise ConfigError("train.lr=0 trains nothing: set --config.train.lr to a positive value (EfficientLLM: 1e-4)")
  if min_lr > lr:
    raise ConfigError(f"train.min_lr={min_lr} is above train.lr={lr}: the cosine decays from lr to min_lr, "
                      "so set min_lr <= lr")
  for key in ("train.b1", "train.b2"):
    b = _non_negative(c, key)
    if not b < 1:
      raise ConfigError(f"{key}={b} must be in [0, 1): Adam's moment decay (EfficientLLM: 0.9 / 0.95)")


def validate_arrayrecord(c) -> None:
  """data.source='arrayrecord': the tokenizer and held-out split were fixed by `data.prepare` (checked at load)."""
  if not isinstance(_get(c, "data.path"), str) or not c.data.path:
    raise ConfigError("data.source='arrayrecord' needs data.path: set --config.data.path=DIR, a directory written "
                      "by python -m efficientllm_jax.data.prepare")
  workers = _non_negative(c, "data.workers")
  if workers != int(workers):
    raise ConfigError(f"data.workers={workers!r} must be a whole number of processes (0 = read in-process)")


def validate_checkpoint(c) -> None:
  every = _non_negative(c, "checkpoint.every")
  if every != int(every):
    raise ConfigError(f"checkpoint.every={every!r} must be a whole number of steps (0 = no checkpoints)")
  _positive_int(c, "checkpoint.keep")
  if not isinstance(_get(c, "checkpoint.async_save"), bool):
    raise ConfigError(f"checkpoint.async_save={c.checkpoint.async_save!r} must be True or False")


def validate_init(c) -> None:
  if not isinstance(_get(c, "init.checkpoint"), str):
    raise ConfigError(f"init.checkpoint={c.init.checkpoint!r} must be a path string (\"\" = random init)")


VALIDATORS = [validate_model, validate_attention, validate_position, validate_ffn, validate_data, validate_train,
              validate_checkpoint, validate_init]


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line naming the key and the fix) for the first mistake found."""
  for check in VALIDATORS:
    check(config)
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
