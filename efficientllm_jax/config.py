"""Config schema helpers and `validate(config)`: one clear ConfigError per user mistake, before anything compiles.

Each message names the offending key, its value, and the fix, on one line.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla", "nsa")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "mosaic")
POSITION_KINDS = ("rope", "sinusoidal", "learned", "relative", "alibi", "none")
BIAS_POSITION_KINDS = ("relative", "alibi")  # logit-bias schemes (ctx.bias)
NSA_IMPLS = ("auto", "reference", "pallas")  # attention.nsa.impl: pure JAX (models/attention/nsa.py) | kernels/nsa
FFN_KINDS = ("dense", "moe")
MOE_IMPLS = ("auto", "ragged_dot", "pallas")
EXPERT_PARALLEL = ("auto", "shard_map", "gspmd")  # moe.expert_parallel (models/moe_ep.py)
EP_EXCHANGES = ("auto", "ragged_all_to_all", "all_to_all")  # moe.ep_exchange
REMAT_POLICIES = ("none", "full", "dots", "dots_attention", "dots_kernels")  # models/remat.py
DTYPES = ("float32", "bfloat16", "float16")
LOGITS_DTYPES = ("float32", "bfloat16")  # train.logits_dtype (train/loss.py)
LOSS_IMPLS = ("auto", "xla", "pallas")  # train.loss_impl (train/loss.py; pallas: kernels/xent; auto: pallas on CUDA)
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
  logits_dtype = _get(c, "train.logits_dtype")
  if logits_dtype not in LOGITS_DTYPES:
    raise ConfigError(f"train.logits_dtype={logits_dtype!r} is not float32 or bfloat16: set "
                      "--config.train.logits_dtype=float32 (default) or bfloat16 (half the loss's logits traffic)")
  _one_of(c, "train.loss_impl", LOSS_IMPLS)
  if _get(c, "train.master_weights") and _get(c, "model.param_dtype") == "float32":
    raise ConfigError("train.master_weights=True needs 16-bit parameters: set --config.model.param_dtype=bfloat16 "
                      "(float32 parameters are their own master copy)")
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


def validate_metrics(c) -> None:
  interval = _non_negative(c, "metrics.sample_interval_s")
  if interval <= 0:
    raise ConfigError(f"metrics.sample_interval_s={interval} must be > 0: the device monitor samples every that many "
                      "seconds (default 0.5)")
  w = _get(c, "metrics.warmup_steps")
  if isinstance(w, bool) or not isinstance(w, int) or w < 0:
    raise ConfigError(f"metrics.warmup_steps={w!r} must be an integer >= 0: steps left out of the timings "
                      "(the compile step is always left out)")
  _non_negative(c, "metrics.peak_flops")
  start, num = _get(c, "profile.start_step"), _get(c, "profile.num_steps")
  for key, v in (("profile.start_step", start), ("profile.num_steps", num)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigError(f"{key}={v!r} must be an integer >= 0: set --config.{key}=N")
  if num and start + num > c.train.steps:
    raise ConfigError(f"profile.start_step={start} + profile.num_steps={num} runs past train.steps={c.train.steps}: "
                      f"trace fewer steps or start earlier (start_step <= {max(c.train.steps - num, 0)})")


def validate_mesh(c) -> None:
  import jax  # noqa: PLC0415 - the device count is only known once the backend starts

  from efficientllm_jax.parallel import sharding  # noqa: PLC0415

  _one_of(c, "mesh.distributed", ("auto", "on", "off"))
  for axis, size in c.mesh.shape.items():
    if axis not in sharding.MESH_AXES:
      raise ConfigError(f"mesh.shape.{axis} is not a mesh axis: use {', '.join(sharding.MESH_AXES)}")
    if isinstance(size, bool) or not isinstance(size, int):
      raise ConfigError(f"mesh.shape.{axis}={size!r} must be an integer (-1 = the remaining devices)")
  try:
    sharding.mesh_shape(dict(c.mesh.shape), jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  known = {name for name, _ in c.sharding_rules}
  for name, axes in c.sharding_rules:
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
      if a not in sharding.MESH_AXES:
        raise ConfigError(f"sharding_rules maps {name!r} to unknown mesh axis {a!r}: use {', '.join(sharding.MESH_AXES)}")
  missing = {"batch", "embed", "vocab", "heads", "kv_heads", "mlp"} - known
  if missing:
    raise ConfigError(f"sharding_rules has no rule for {', '.join(sorted(missing))}: add (name, axes or None)")
  dp = sharding.data_parallel_size(c)
  if c.train.micro_batch % dp:
    raise ConfigError(f"train.micro_batch={c.train.micro_batch} is not divisible by the {dp} data-parallel devices "
                      f"(mesh {dict(c.mesh.shape)}): use a multiple of {dp} or change mesh.shape")


def validate_position_kinds(c) -> None:
  """Keys of the non-RoPE schemes and combinations that make no sense (after validate_position/_data)."""
  kind = c.position.kind
  if kind == "learned":
    n, t = _positive_int(c, "position.max_len"), c.data.seq_len
    if t > n:
      raise ConfigError(f"position.max_len={n} is shorter than data.seq_len={t}: the learned table has one row per "
                        f"position, so set --config.position.max_len={t} (or more) or a shorter data.seq_len")
  if kind == "sinusoidal" and c.model.hidden % 2:
    raise ConfigError(f"position.kind='sinusoidal' pairs sin/cos over model.hidden={c.model.hidden} dims: "
                      "use an even model.hidden")
  if kind == "relative":
    nb, md = _positive_int(c, "position.num_buckets"), _positive_int(c, "position.max_distance")
    if nb < 2:
      raise ConfigError(f"position.num_buckets={nb} leaves no log-spaced buckets: use at least 2 (T5: 32)")
    if md <= nb // 2:
      raise ConfigError(f"position.max_distance={md} must exceed position.num_buckets/2={nb // 2} (the exact "
                        f"buckets): raise it (T5: 128) or lower position.num_buckets")
  if kind in BIAS_POSITION_KINDS and c.attention.impl == "cudnn":
    raise ConfigError(f"position.kind={kind!r} adds a logit bias that the cuDNN path cannot take without a dense "
                      "[B,H,T,T] tensor: use --config.attention.impl=auto (falls back to xla) or xla")
  if kind in BIAS_POSITION_KINDS and c.attention.impl == "mosaic":
    raise ConfigError(f"position.kind={kind!r} adds a logit bias that the Mosaic GPU kernels do not take: use "
                      "--config.attention.impl=pallas (in-kernel biases) or auto")
  # MLA with a non-rope kind is defined (models/attention/mla.py): its decoupled q/k dims stay unrotated.




def validate_moe(c) -> None:
  """moe.* keys, checked only when ffn.kind == 'moe' (dense configs may carry any moe section)."""
  if _get(c, "ffn.kind") != "moe":
    return
  e = _positive_int(c, "moe.num_experts")
  k = _positive_int(c, "moe.top_k")
  if k > e:
    raise ConfigError(f"moe.top_k={k} exceeds moe.num_experts={e}: each token picks top_k distinct experts, "
                      f"so set --config.moe.top_k to at most {e}")
  _positive_int(c, "moe.expert_dim")
  for key in ("moe.renormalize", "moe.shared_expert_gate"):
    if not isinstance(_get(c, key), bool):
      raise ConfigError(f"{key}={_get(c, key)!r} must be a bool: set --config.{key}=True or --config.{key}=False")
  if k == 1 and c.moe.renormalize:
    raise ConfigError("moe.renormalize=True with moe.top_k=1 makes every gate weight 1, so the router learns only "
                      "from the aux loss: set --config.moe.renormalize=False (Switch) or moe.top_k >= 2")
  cf = _get(c, "moe.capacity_factor")
  if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf):
    raise ConfigError(f"moe.capacity_factor={cf!r} must be a number: <= 0 for dropless, > 0 for capacity-based")
  for key in ("moe.aux_loss_coef", "moe.z_loss_coef", "moe.num_shared_experts", "moe.shared_expert_dim"):
    _non_negative(c, key)
  for key in ("moe.num_shared_experts", "moe.shared_expert_dim"):
    if not isinstance(_get(c, key), int):
      raise ConfigError(f"{key}={_get(c, key)!r} must be a whole number: set --config.{key}=N with N >= 0")
  if c.moe.shared_expert_gate and not c.moe.num_shared_experts:
    raise ConfigError("moe.shared_expert_gate=True gates a shared expert, but moe.num_shared_experts=0: "
                      "set --config.moe.num_shared_experts=1 or turn the gate off")




def validate_mla(c) -> None:
  """attention.mla.* (only when attention.kind == 'mla')."""
  if c.attention.kind != "mla":
    return
  for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    _positive_int(c, f"attention.mla.{key}")
  q_rank = _get(c, "attention.mla.q_lora_rank")
  if isinstance(q_rank, bool) or not isinstance(q_rank, int) or q_rank < 0:
    raise ConfigError(f"attention.mla.q_lora_rank={q_rank!r} must be an integer >= 0: 0 = no query compression "
                      "(DeepSeek-V2-Lite), N > 0 = compress queries to rank N (DeepSeek-V2: 1536)")
  rope = c.attention.mla.qk_rope_head_dim
  if c.position.kind == "rope" and rope % 2:
    raise ConfigError(f"attention.mla.qk_rope_head_dim={rope} must be even for RoPE (dims rotate in pairs): "
                      f"set --config.attention.mla.qk_rope_head_dim={rope + 1}")




def validate_nsa(c) -> None:
  """NSA geometry (models/attention/nsa.py): block l, stride d, selection block l', n selected, window w."""
  if c.attention.kind != "nsa":
    return
  keys = ("compress_block", "compress_stride", "select_block", "num_selected", "window", "local_blocks")
  l, d, ls, n, w, local = (_positive_int(c, f"attention.nsa.{k}") for k in keys)
  chunk = _non_negative(c, "attention.nsa.query_chunk")
  if isinstance(chunk, float) and not chunk.is_integer():
    raise ConfigError(f"attention.nsa.query_chunk={chunk} must be a whole number of queries (0 = auto)")
  if d > l:
    raise ConfigError(f"attention.nsa.compress_stride={d} exceeds attention.nsa.compress_block={l}: tokens between "
                      f"blocks would never be compressed; use a stride <= the block (EfficientLLM: {l // 2})")
  if l % d:
    raise ConfigError(f"attention.nsa.compress_block={l} is not a multiple of attention.nsa.compress_stride={d}: "
                      f"choose a stride dividing the block ({_divisors(l)})")
  if ls % d:
    raise ConfigError(f"attention.nsa.select_block={ls} is not a multiple of attention.nsa.compress_stride={d}: "
                      "the score remap sums whole strides; use a multiple of the stride (paper: 64 with stride 16)")
  if n < 1 + local:
    raise ConfigError(f"attention.nsa.num_selected={n} cannot hold the first block plus "
                      f"attention.nsa.local_blocks={local} local blocks: set num_selected >= {1 + local}")
  if c.attention.window:
    raise ConfigError(f"attention.window={c.attention.window} is the GQA sliding window; NSA's window is "
                      "attention.nsa.window: set --config.attention.window=0")
  t = c.data.seq_len
  if t < l or t < ls:
    raise ConfigError(f"data.seq_len={t} is shorter than one NSA block (compress_block={l}, select_block={ls}): "
                      f"lower the blocks or raise data.seq_len to >= {max(l, ls)}")


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


def nsa_kernels_misfit(c) -> str | None:
  """Why the NSA Pallas kernels (kernels/nsa) cannot run this config, or None: they tile by powers of two and take
  no logit bias. validate() raises it for an explicit attention.nsa.impl=pallas; auto then takes the reference."""
  if c.position.kind in BIAS_POSITION_KINDS:
    return (f"attention.nsa.impl=pallas takes no logit bias, but position.kind={c.position.kind!r} adds "
            "one: use --config.attention.nsa.impl=reference or a rope / additive position")
  for key in ("attention.nsa.select_block", "model.head_dim"):
    v = int(_get(c, key))
    if v < 1 or v & (v - 1):
      return (f"{key}={v} must be a power of two for attention.nsa.impl=pallas (Triton tiles): "
              "use attention.nsa.impl=reference")
  return None


def validate_nsa_impl(c) -> None:
  """attention.nsa.impl, and for pallas whether the kernels can run the config."""
  if c.attention.kind != "nsa":
    return
  if _one_of(c, "attention.nsa.impl", NSA_IMPLS) == "pallas" and (reason := nsa_kernels_misfit(c)):
    raise ConfigError(reason)


def validate_pallas(c) -> None:
  """attention.pallas.* (flash-kernel tiles), checked whenever present: auto picks the kernel on TPU."""
  if "pallas" not in c.attention:
    return
  for key in ("block_q", "block_k"):
    n = _positive_int(c, f"attention.pallas.{key}")
    if n < 16 or n & (n - 1):
      raise ConfigError(f"attention.pallas.{key}={n} must be a power of two >= 16 (Triton tiles): e.g. 32, 64, 128")
  warps = _positive_int(c, "attention.pallas.num_warps")
  if warps & (warps - 1) or warps > 16:
    raise ConfigError(f"attention.pallas.num_warps={warps} must be 1, 2, 4, 8 or 16 (warps per Triton program)")
  _positive_int(c, "attention.pallas.num_stages")


def validate_moe_impl(c) -> None:
  """moe.impl picks the dropless grouped matmul; the capacity path (batched einsum) ignores it."""
  if _get(c, "ffn.kind") != "moe":
    return
  _one_of(c, "moe.impl", MOE_IMPLS)


def validate_expert_parallel(c) -> None:
  """moe.expert_parallel and its keys; when the shard_map path would run (mesh.shape.expert > 1, dropless), what it
  needs: experts divisible over `expert`, expert weights and tokens split over it (after validate_mesh)."""
  if _get(c, "ffn.kind") != "moe":
    return
  mode = _one_of(c, "moe.expert_parallel", EXPERT_PARALLEL)
  exchange = _one_of(c, "moe.ep_exchange", EP_EXCHANGES)
  cf = _get(c, "moe.ep_capacity_factor")
  if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf):
    raise ConfigError(f"moe.ep_capacity_factor={cf!r} must be a number: <= 0 for the dropless buffer bound, > 0 for "
                      "that many times the balanced load")
  if mode == "gspmd":
    return
  if c.moe.capacity_factor > 0:
    if mode == "shard_map":
      raise ConfigError(f"moe.expert_parallel='shard_map' runs the dropless path, but moe.capacity_factor="
                        f"{c.moe.capacity_factor} asks for capacity dispatch: set --config.moe.capacity_factor=0 or "
                        "--config.moe.expert_parallel=gspmd")
    return
  import jax  # noqa: PLC0415 - the device count is only known once the backend starts

  from efficientllm_jax.parallel import sharding  # noqa: PLC0415
  ep = sharding.mesh_sizes(c)["expert"]
  if ep == 1:
    return
  e = c.moe.num_experts
  if e % ep:
    raise ConfigError(f"moe.num_experts={e} is not divisible by mesh.shape.expert={ep}: expert parallelism gives each "
                      f"device num_experts/expert experts; use an expert axis of {_divisors(e)} or "
                      "--config.moe.expert_parallel=gspmd")
  rules = sharding.rules_of(c)
  axes = {name: sharding.mesh_axes(a) for name, a in rules.items()}
  if axes.get("expert") != ("expert",):
    raise ConfigError(f"sharding_rules maps 'expert' to {rules.get('expert')!r}: moe.expert_parallel needs the expert "
                      "weights split over the `expert` mesh axis, so restore ('expert', 'expert') or use "
                      "--config.moe.expert_parallel=gspmd")
  if "expert" not in axes.get("batch", ()):
    raise ConfigError(f"sharding_rules maps 'batch' to {rules.get('batch')!r}: moe.expert_parallel needs the tokens "
                      "split over the `expert` mesh axis too, so add 'expert' to the batch rule or use "
                      "--config.moe.expert_parallel=gspmd")
  backend = jax.default_backend()
  if exchange == "ragged_all_to_all" and backend == "cpu":
    raise ConfigError("moe.ep_exchange='ragged_all_to_all' is not implemented by XLA:CPU: use "
                      "--config.moe.ep_exchange=auto (all_to_all on CPU)")
  if c.moe.impl == "pallas" and backend != "gpu":
    raise ConfigError(f"moe.impl='pallas' runs interpreted on {backend}, which the expert-parallel shard_map's type "
                      "checks reject: use --config.moe.impl=auto (ragged_dot here) or moe.expert_parallel=gspmd")


VALIDATORS = [validate_model, validate_attention, validate_mla, validate_nsa, validate_position, validate_position_kinds,
              validate_ffn, validate_moe, validate_data, validate_train, validate_metrics, validate_mesh,
              validate_checkpoint, validate_init, validate_nsa_impl, validate_pallas, validate_moe_impl,
              validate_expert_parallel]


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line naming the key and the fix) for the first mistake found."""
  for check in VALIDATORS:
    check(config)
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
