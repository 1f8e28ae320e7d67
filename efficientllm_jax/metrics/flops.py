"""Analytic training FLOPs per optimizer step, per attention / FFN kind, and the peak FLOP/s of a device kind.

Conventions (the numbers MFU divides by):
  - A matmul [m, k] x [k, n] costs 2*m*k*n FLOPs. Only matmuls are counted: biases, norms, RoPE, activations,
    softmax, masking, residuals, the loss' logsumexp and the optimizer update are elementwise and left out.
  - Training = 3 x forward (the backward pass computes gradients for inputs and for weights, 2 x forward each
    matmul). Rematerialised recomputation is NOT counted: these are model FLOPs (as in PaLM's MFU), so `remat`
    changes time, never the FLOP count.
  - Attention cores count the (query, key) pairs the mask lets through: full causal is T(T+1)/2 pairs per head
    ("half" of the square, plus the diagonal); a sliding window of w keeps sum_i min(i+1, w). Each pair costs
    2*d_qk (scores) + 2*d_v (probabilities x values). `dense_attention=True` counts T^2 pairs instead: what an
    einsum with a mask actually multiplies (used to compare with XLA's cost analysis; for nsa: the compressed
    keys plus T^2 for each of the selected and window branches).
  - mha / gqa / mqa: q, k, v, o projections (hidden -> heads*head_dim, hidden -> kv_heads*head_dim twice,
    heads*head_dim -> hidden) + the attention core.
  - mla (DeepSeek-V2, training path, no absorption): q = hidden -> heads*(nope+rope), or hidden -> q_lora_rank ->
    heads*(nope+rope) when q_lora_rank > 0; W_dkv hidden -> kv_lora_rank; W_kr hidden -> qk_rope_head_dim (the
    shared RoPE key); W_uk kv_lora_rank -> heads*nope; W_uv kv_lora_rank -> heads*v; o heads*v -> hidden.
    Core: d_qk = nope + rope, d_v = v_head_dim.
  - nsa: one shared q projection and o projection (as gqa); each of the three branches (compressed, selected,
    window) has its own k and v projections (hidden -> kv_heads*head_dim, x 3 branches x 2); gates are one
    hidden -> 3*heads linear (+ sigmoid); the compression MLP phi (models/attention/nsa.CompressMLP) is two
    linears (l*head_dim -> head_dim -> head_dim) per block, per kv head, for k and for v, over the
    floor((T - l)/d) + 1 blocks of a sequence.
    Attended tokens for query i (0-based) per head:
      compressed  floor((i + 1 - l)/d) + 1 blocks that end at or before i (0 while i + 1 < l)   ~ t/d
      selected    i + 1 while at most n blocks exist, else (n - 1)*l' full blocks + the (i mod l') + 1 visible
                  tokens of the current block (the current block is always one of the n, as the paper's local
                  blocks)   ~ n*l'
      window      min(w, i + 1)
    each at 2*head_dim + 2*head_dim per attended token; the selection scores (sums of p_cmp) are elementwise.
  - FFN: dense SwiGLU = gate, up (hidden -> ffn_dim) and down (ffn_dim -> hidden). MoE = the router
    (hidden -> num_experts) + top_k routed SwiGLU experts of moe.expert_dim per token (drops under a capacity
    factor are not subtracted) + num_shared_experts shared SwiGLU experts of the same width.
  - LM head: the tied embedding as a hidden -> vocab matmul for every token; the embedding lookup is a gather.
  - Per step: forward FLOPs per sequence x micro_batch x grad_accum (the global batch), x 3.
"""

from __future__ import annotations

import numpy as np

# bf16 dense (no sparsity) tensor-core / MXU peak FLOP/s per device, keyed by jax `device.device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.5e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.5e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA GH200 480GB": 989.5e12,
    "NVIDIA GH200 144G HBM3e": 989.5e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
# Device-kind strings vary by board and driver (e.g. "NVIDIA H100 80GB HBM3" vs "NVIDIA H100 SXM5 80GB"):
# families matched by substring when no exact key matches, first hit wins (specific variants first).
_FAMILIES = (
    (("h100", "pcie"), 756.5e12), (("h100", "nvl"), 835.5e12), (("h200", "nvl"), 835.5e12),
    (("gh200",), 989.5e12), (("h100",), 989.5e12), (("h200",), 989.5e12), (("a100",), 312e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> tuple[float | None, str]:
  """(peak bf16 dense FLOP/s, where it came from); (None, reason) for a device kind we cannot vouch for."""
  if override and override > 0:
    return float(override), "metrics.peak_flops"
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind], f"table[{device_kind!r}]"
  low = device_kind.lower()
  for needles, value in _FAMILIES:
    if all(n in low for n in needles):
      return value, f"family {'+'.join(needles)} of {device_kind!r}"
  return None, (f"no peak FLOP/s known for device_kind {device_kind!r}: set --config.metrics.peak_flops=<bf16 dense "
                "FLOP/s per device>")


# ---- attended (query, key) pairs -------------------------------------------------------------------------------

def causal_pairs(t: int, window: int = 0) -> int:
  """Visible (query, key) pairs of a causal mask over t tokens, optionally with a sliding window."""
  if not window or window >= t:
    return t * (t + 1) // 2
  return window * (window + 1) // 2 + (t - window) * window


def nsa_attended(t: int, *, compress_block: int, compress_stride: int, select_block: int, num_selected: int,
                 window: int) -> dict[str, int]:
  """Attended tokens per head, summed over the t queries of a sequence, per NSA branch (conventions above)."""
  i = np.arange(t, dtype=np.int64)
  cmp = np.where(i + 1 >= compress_block, (i + 1 - compress_block) // compress_stride + 1, 0)
  blocks_so_far = i // select_block + 1
  slc = np.where(blocks_so_far <= num_selected, i + 1, (num_selected - 1) * select_block + i % select_block + 1)
  win = np.minimum(window, i + 1)
  return {"cmp": int(cmp.sum()), "slc": int(slc.sum()), "win": int(win.sum())}


def nsa_num_blocks(t: int, compress_block: int, compress_stride: int) -> int:
  return (t - compress_block) // compress_stride + 1 if t >= compress_block else 0


# ---- forward FLOPs per sequence ----------------------------------------------------------------------------------

def _attention_flops(cfg, t: int, dense_attention: bool) -> tuple[float, float]:
  """(projection FLOPs, core FLOPs) of one layer over one sequence of t tokens."""
  m, a = cfg.model, cfg.attention
  d, h, kv, hd = m.hidden, m.num_heads, m.num_kv_heads, m.head_dim
  pairs = t * t if dense_attention else causal_pairs(t, int(a.window))
  if a.kind in ("mha", "gqa", "mqa"):
    proj = 2 * t * (d * h * hd + 2 * d * kv * hd + h * hd * d)
    return proj, pairs * h * (2 * hd + 2 * hd)
  if a.kind == "mla":
    c = a.mla
    dqk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = d * h * dqk if not c.q_lora_rank else d * c.q_lora_rank + c.q_lora_rank * h * dqk
    kv_path = d * c.kv_lora_rank + d * c.qk_rope_head_dim + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    proj = 2 * t * (q + kv_path + h * c.v_head_dim * d)
    return proj, pairs * h * (2 * dqk + 2 * c.v_head_dim)
  if a.kind == "nsa":
    n = a.nsa
    proj = 2 * t * (d * h * hd + 3 * 2 * d * kv * hd + d * 3 * h + h * hd * d)
    phi = 2 * nsa_num_blocks(t, n.compress_block, n.compress_stride) * kv * 2 * (n.compress_block * hd + hd) * hd
    if dense_attention:  # a masked reference: compressed keys in full, raw keys in full for slc and win
      attended = t * nsa_num_blocks(t, n.compress_block, n.compress_stride) + 2 * t * t
    else:
      attended = sum(nsa_attended(t, compress_block=n.compress_block, compress_stride=n.compress_stride,
                                  select_block=n.select_block, num_selected=n.num_selected,
                                  window=n.window).values())
    return proj + phi, attended * h * (2 * hd + 2 * hd)
  raise ValueError(f"attention.kind={a.kind!r} has no FLOP count: add it to metrics/flops.py")


def _ffn_flops(cfg, t: int) -> float:
  d = cfg.model.hidden
  if cfg.ffn.kind == "dense":
    return 2 * t * 3 * d * cfg.model.ffn_dim
  if cfg.ffn.kind == "moe":
    mo = cfg.moe
    experts = (mo.top_k + mo.num_shared_experts) * 3 * d * mo.expert_dim
    return 2 * t * (d * mo.num_experts + experts)
  raise ValueError(f"ffn.kind={cfg.ffn.kind!r} has no FLOP count: add it to metrics/flops.py")


def forward_flops_per_sequence(cfg, *, dense_attention: bool = False) -> dict[str, float]:
  """Forward matmul FLOPs of one sequence of data.seq_len tokens, by part (all layers summed)."""
  t, layers = cfg.data.seq_len, cfg.model.num_layers
  proj, core = _attention_flops(cfg, t, dense_attention)
  parts = {
      "attention_projections": layers * proj,
      "attention_core": layers * core,
      "ffn": layers * _ffn_flops(cfg, t),
      "lm_head": 2 * t * cfg.model.hidden * cfg.model.vocab_size,
  }
  parts["total"] = sum(parts.values())
  return parts


def training_flops_per_step(cfg, *, dense_attention: bool = False) -> float:
  """Model FLOPs of one optimizer step over the global batch: 3 x forward, remat recompute not counted."""
  sequences = cfg.train.micro_batch * cfg.train.grad_accum
  return 3.0 * forward_flops_per_sequence(cfg, dense_attention=dense_attention)["total"] * sequences

