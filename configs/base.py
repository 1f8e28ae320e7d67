"""Base config: Qwen2.5 dense GQA decoder with the EfficientLLM training recipe.

Usage: --config=configs/base.py:1.5B  (presets: tiny, 0.5B, 1.5B, 3B)
Every other config file starts from `get_config(size)` here and changes only its own section.
"""

import ml_collections

from efficientllm_jax.parallel import axes

# Qwen2.5 dimensions (PAPERS.md): hidden, layers, heads, kv heads, head dim, SwiGLU width, micro-batch.
SIZES = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=384, micro_batch=8),
    "0.5B": dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, ffn=4864, micro_batch=4),
    "1.5B": dict(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, ffn=8960, micro_batch=2),
    "3B": dict(hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, ffn=11008, micro_batch=1),
}
QWEN_VOCAB = 151936


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in SIZES:
    raise ValueError(f"unknown size preset {arg!r}: use one of {', '.join(SIZES)} (e.g. configs/base.py:1.5B)")
  s = SIZES[arg]
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.size = arg

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096 if tiny else QWEN_VOCAB  # must cover the tokenizer's vocabulary
  m.hidden = s["hidden"]
  m.num_layers = s["layers"]
  m.num_heads = s["heads"]
  m.num_kv_heads = s["kv_heads"]
  m.head_dim = s["head_dim"]
  m.ffn_dim = s["ffn"]
  m.rms_eps = 1e-6
  m.qkv_bias = True
  m.tie_embeddings = True
  m.init_std = 0.02
  m.param_dtype = "float32"
  m.dtype = "float32" if tiny else "bfloat16"  # compute dtype (CPUs emulate bf16 slowly)
  # Block rematerialisation (models/remat.py): none | full | dots (keep matmul outputs) | dots_attention (dots +
  # the attention kernel's output and residuals: measured fastest at 0.5B / 1.5B / 8K on an H200,
  # benchmarks/RESULTS.md) | dots_kernels (dots_attention + MoE grouped-matmul outputs: faster MoE, +31 GB there).
  m.remat = "none" if tiny else "dots_attention"
  # True: one block compiled and scanned over layers (compile ~17 s at 0.5B/1.5B). False unrolls the layers: ~5 %
  # faster steps and less memory on an H200 (no copies of saved residuals into the scan's stacked buffer), but
  # 2-2.5 min of compile; worth it for long runs (benchmarks/RESULTS.md, session 5).
  m.scan_layers = True

  c.attention = a = ml_collections.ConfigDict()
  a.kind = "gqa"  # mha | gqa | mqa (num_kv_heads decides) | mla | nsa
  a.impl = "auto"  # auto | xla | cudnn | pallas | mosaic (models/attention/ops.py)
  a.window = 0  # sliding window in tokens, 0 = full causal
  # Flash-kernel tiles (impl pallas, kernels/flash): block_q rows of (query, group head), block_k keys (powers of
  # two >= 16); num_warps / num_stages are the Triton launch parameters (GPU only).
  a.pallas = ml_collections.ConfigDict()
  a.pallas.block_q = 64
  a.pallas.block_k = 64
  a.pallas.num_warps = 4
  a.pallas.num_stages = 2
  # MLA (DeepSeek-V2), used when kind == "mla"; suite defaults: kv_lora_rank = hidden/8 (EfficientLLM).
  a.mla = ml_collections.ConfigDict()
  a.mla.kv_lora_rank = max(s["hidden"] // 8, 8)
  a.mla.q_lora_rank = 0  # 0 = no query compression (as DeepSeek-V2-Lite)
  a.mla.qk_rope_head_dim = 8 if tiny else 64
  a.mla.qk_nope_head_dim = s["head_dim"]
  a.mla.v_head_dim = s["head_dim"]
  # NSA (native sparse attention), used when kind == "nsa"; EfficientLLM setting (paper's: 32/16/64/16/512).
  a.nsa = ml_collections.ConfigDict()
  a.nsa.compress_block = 16 if tiny else 64  # l
  a.nsa.compress_stride = 8 if tiny else 32  # d
  a.nsa.select_block = 16 if tiny else 64  # l'
  a.nsa.num_selected = 4  # n, counting the first block and the local blocks
  a.nsa.window = 32 if tiny else 128  # w
  a.nsa.local_blocks = 2  # blocks ending at the query's own block that are always selected (paper: 2)
  a.nsa.query_chunk = 0  # queries per chunk of the compressed/selected scan; 0 = auto (memory-bounded)
  # auto (pallas on GPU when the geometry suits the kernels, else reference) | reference (pure JAX,
  # models/attention/nsa.py) | pallas (kernels/nsa; interpreted off GPU)
  a.nsa.impl = "auto"

  c.position = p = ml_collections.ConfigDict()
  p.kind = "rope"  # rope | sinusoidal | learned | relative | alibi | none (models/positional.py)
  p.rope_theta = 1e6
  p.rope_fraction = 1.0  # fraction of head_dim that is rotated (partial rotary)
  p.max_len = 128 if tiny else 8192  # learned: rows of the table, must be >= data.seq_len
  p.num_buckets = 32  # relative (T5): log-spaced causal distance buckets
  p.max_distance = 128  # relative (T5): distances beyond this share the last bucket

  c.ffn = f = ml_collections.ConfigDict()
  f.kind = "dense"  # dense (SwiGLU) | moe

  c.moe = mo = ml_collections.ConfigDict()  # used when ffn.kind == "moe" (models/moe.py)
  mo.num_experts = 8
  mo.top_k = 2
  mo.expert_dim = s["ffn"]  # width of each SwiGLU expert (the size's FFN width)
  mo.renormalize = True  # top-k weights renormalised to sum to 1
  mo.capacity_factor = 0.0  # <= 0: dropless (sorted + ragged_dot); > 0: capacity-based, drops counted
  # Dropless grouped matmul: auto (pallas on one GPU, else ragged_dot) | ragged_dot (jax.lax.ragged_dot) | pallas
  # (kernels/gmm; interpreted off GPU).
  mo.impl = "auto"
  # Expert parallelism (models/moe_ep.py) when mesh.shape.expert > 1: auto (= shard_map for the dropless path) |
  # shard_map (explicit all-to-all over `expert`) | gspmd (leave the dispatch to the XLA partitioner).
  mo.expert_parallel = "auto"
  mo.ep_capacity_factor = 0.0  # shard_map receive buffer: <= 0 dropless bound; f > 0: f * balanced load, drops counted
  mo.ep_exchange = "auto"  # auto (= all_to_all) | all_to_all (padded buffers) | ragged_all_to_all (not on CPU)
  mo.aux_loss_coef = 0.01  # Switch load-balancing loss
  mo.z_loss_coef = 0.0  # router z-loss
  mo.num_shared_experts = 0  # always-on experts beside the routed ones (DeepSeek / Qwen2-MoE)
  mo.shared_expert_dim = 0  # width of each shared expert; 0 = moe.expert_dim
  mo.shared_expert_gate = False  # Qwen2-MoE's per-token sigmoid gate on the shared output

  c.data = d = ml_collections.ConfigDict()
  d.source = "embedded"  # embedded: the running Python's standard-library sources | arrayrecord: data.path
  d.path = ""  # arrayrecord: a directory written by `python -m efficientllm_jax.data.prepare`
  d.workers = 0  # grain worker processes reading/decoding records (0 = threads in the training process)
  d.tokenizer = "bpe"  # bpe (byte-level BPE trained on the corpus, cached) | bytes; embedded only
  d.bpe_vocab_size = 4096
  d.max_corpus_mb = 8.0 if tiny else 0.0  # 0 = whole corpus
  d.seq_len = 128 if tiny else 8192
  d.eval_fraction = 0.02  # embedded only (arrayrecord: prepare's --eval_fraction made the held-out shards)
  d.shuffle_seed = 0
  d.cache_dir = ""  # "" = ~/.cache/efficientllm_jax (or $EFFICIENTLLM_CACHE)
  d.prefetch = 2

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200 if tiny else 1000
  t.micro_batch = s["micro_batch"]
  t.grad_accum = 1
  t.lr = 3e-3 if tiny else 1e-4
  t.min_lr = 3e-4 if tiny else 1e-5
  t.warmup_steps = 20 if tiny else 100
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.clip_norm = 1.0
  # With model.param_dtype=bfloat16: AdamW updates an fp32 copy of the parameters kept in the optimizer state, and
  # the bf16 parameters are that copy rounded (train/optimizer.py). False: bf16 parameters are updated in bf16.
  t.master_weights = False
  t.seed = 0
  t.loss_chunk = 2048  # tokens per cross-entropy chunk (bounds fp32 logits memory); 0 = no chunking
  t.logits_dtype = "float32"  # float32 | bfloat16: the LM-head matmul's output in the loss (bf16: half the traffic)
  # auto | xla | pallas: a chunk's log-sum-exp, target logit and dlogits in one Triton kernel (kernels/xent);
  # auto takes it on NVIDIA GPUs (1.3 % faster 0.5B steps on an H200) and XLA elsewhere.
  t.loss_impl = "auto"
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4

  # Parallelism (parallel/sharding.py): mesh axes data / fsdp / tensor / expert, -1 takes the remaining devices.
  c.mesh = ms = ml_collections.ConfigDict()
  ms.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  ms.distributed = "auto"  # auto | on | off: jax.distributed.initialize (parallel/distributed.py)
  ms.coordinator_address = ""  # explicit multi-host setup when not auto-detected
  ms.num_processes = 1
  ms.process_id = 0
  # Logical axis -> mesh axes (None = replicated); see parallel/axes.DEFAULT_RULES for the meaning.
  c.sharding_rules = [list(r) for r in axes.DEFAULT_RULES]

  c.metrics = mt = ml_collections.ConfigDict()  # efficiency metrics (metrics/efficiency.py)
  mt.sample_interval_s = 0.5  # device monitor period (memory, NVML power / utilisation / energy)
  mt.warmup_steps = 2  # first steps left out of AL/TT/ST/MFU/AMU/PCU/AEC; the compile step is always left out
  mt.peak_flops = 0.0  # bf16 dense FLOP/s per device for MFU; 0 = look up the device kind (metrics/flops.py)

  c.profile = pr = ml_collections.ConfigDict()  # jax.profiler trace into workdir/tb (TensorBoard's profile tab)
  pr.start_step = 5  # first traced step
  pr.num_steps = 0  # steps traced; 0 = off

  c.checkpoint = ck = ml_collections.ConfigDict()  # orbax checkpointing (train/checkpoint.py)
  ck.every = 100 if tiny else 500  # save every N steps and at the end; 0 = no checkpoints (no resume)
  ck.keep = 3  # most recent checkpoints kept
  ck.async_save = True  # write in a background thread while training goes on

  c.init = ml_collections.ConfigDict()  # initial weights (e.g. imported Qwen2.5)
  c.init.checkpoint = ""  # a directory written by `python -m efficientllm_jax.tools.import_hf` ("" = random init)
  return c
