"""Analytic FLOPs against hand counts written out here, per attention and FFN kind, and the peak FLOP/s table."""

from __future__ import annotations

import numpy as np
import pytest

from configs import base
from efficientllm_jax.metrics import flops

# The small shape every hand count below uses.
D, L, H, HD, F, V, T, MB, GA = 64, 2, 4, 16, 96, 256, 32, 2, 3


def small(kind="gqa", kv=2):
  c = base.get_config("tiny")
  m = c.model
  m.hidden, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size = D, L, H, kv, HD, F, V
  c.attention.kind = kind
  c.data.seq_len = T
  c.train.micro_batch, c.train.grad_accum = MB, GA
  return c


HEAD = 2 * D * V  # tied LM head per token
DENSE_FFN = 3 * 2 * D * F  # gate, up, down per token
CAUSAL_PAIRS = sum(i + 1 for i in range(T))  # query i sees keys 0..i


def per_step(fwd_per_sequence):
  return 3 * fwd_per_sequence * MB * GA


@pytest.mark.parametrize("kind,kv,proj_per_token", [
    ("mha", 4, 2 * D * 64 + 2 * 2 * D * 64 + 2 * 64 * D),  # q 64 wide, k and v 4 heads x 16, o
    ("gqa", 2, 2 * D * 64 + 2 * 2 * D * 32 + 2 * 64 * D),  # k, v: 2 heads x 16
    ("mqa", 1, 2 * D * 64 + 2 * 2 * D * 16 + 2 * 64 * D),  # k, v: 1 head x 16
])
def test_mha_gqa_mqa_dense_ffn(kind, kv, proj_per_token):
  core = CAUSAL_PAIRS * H * (2 * HD + 2 * HD)  # scores + probabilities x values
  fwd = L * (T * proj_per_token + core + T * DENSE_FFN) + T * HEAD
  assert flops.training_flops_per_step(small(kind, kv)) == per_step(fwd)


def test_gqa_literal():
  # Worked by hand: per layer 786,432 (projections) + 135,168 (core) + 1,179,648 (FFN); head 1,048,576.
  assert flops.forward_flops_per_sequence(small())["total"] == 2 * (786_432 + 135_168 + 1_179_648) + 1_048_576
  assert flops.training_flops_per_step(small()) == 94_519_296


def test_sliding_window_counts_visible_pairs():
  mask = np.tril(np.ones((T, T), bool)) & ~np.tril(np.ones((T, T), bool), -8)  # keys i-7..i
  assert flops.causal_pairs(T, 8) == mask.sum() == 36 + (T - 8) * 8
  assert flops.causal_pairs(T, 0) == np.tril(np.ones((T, T))).sum()
  c = small()
  c.attention.window = 8
  full, win = flops.forward_flops_per_sequence(small()), flops.forward_flops_per_sequence(c)
  assert full["attention_core"] - win["attention_core"] == L * (CAUSAL_PAIRS - mask.sum()) * H * 4 * HD


@pytest.mark.parametrize("q_lora,q_proj", [(0, 2 * D * H * 24), (12, 2 * D * 12 + 2 * 12 * H * 24)])
def test_mla(q_lora, q_proj):
  c = small("mla")
  c.attention.mla.update(kv_lora_rank=16, q_lora_rank=q_lora, qk_rope_head_dim=8, qk_nope_head_dim=16,
                         v_head_dim=16)
  per_token = (q_proj  # queries of nope 16 + rope 8 per head
               + 2 * D * 16  # W_dkv to the latent
               + 2 * D * 8  # W_kr, the shared RoPE key
               + 2 * 16 * H * 16  # W_uk latent -> per-head nope keys
               + 2 * 16 * H * 16  # W_uv latent -> per-head values
               + 2 * H * 16 * D)  # o
  core = CAUSAL_PAIRS * H * (2 * 24 + 2 * 16)
  fwd = L * (T * per_token + core + T * DENSE_FFN) + T * HEAD
  assert flops.training_flops_per_step(c) == per_step(fwd)


def _nsa_attended_by_mask(t, l, d, lp, n, w):
  """Count attended keys per branch with explicit masks (a plain loop over queries)."""
  cmp = slc = win = 0
  for i in range(t):
    cmp += sum(1 for j in range(t) if j * d + l - 1 <= i)  # blocks ending at or before i
    cur = i // lp
    earlier = list(range(cur))[: n - 1]  # any n-1 full earlier blocks (here: the first ones) + the current one
    chosen = earlier + [cur]
    slc += sum(1 for b in chosen for key in range(b * lp, (b + 1) * lp) if key <= i)
    win += sum(1 for key in range(t) if i - w < key <= i)
  return cmp, slc, win


def test_nsa():
  c = small("nsa")
  c.attention.nsa.update(compress_block=8, compress_stride=4, select_block=8, num_selected=2, window=8)
  cmp, slc, win = _nsa_attended_by_mask(T, 8, 4, 8, 2, 8)
  got = flops.nsa_attended(T, compress_block=8, compress_stride=4, select_block=8, num_selected=2, window=8)
  assert (got["cmp"], got["slc"], got["win"]) == (cmp, slc, win)
  blocks = (T - 8) // 4 + 1  # 7 compressed blocks
  per_token = (2 * D * 64  # shared q
               + 3 * 2 * (2 * D * 32)  # own k and v per branch, 2 kv heads x 16
               + 2 * D * 3 * H  # gates: one per branch per head
               + 2 * 64 * D)  # o
  phi = blocks * 2 * 2 * (2 * (8 * HD * HD + HD * HD))  # k and v, 2 kv heads, (8 x 16) -> 16 -> 16 MLP
  core = (cmp + slc + win) * H * (2 * HD + 2 * HD)
  fwd = L * (T * per_token + phi + core + T * DENSE_FFN) + T * HEAD
  assert flops.training_flops_per_step(c) == per_step(fwd)


def test_nsa_attended_long_sequence_scales_like_paper():
  # Per query: ~t/d compressed, n*l' selected, w window -- far below the causal t/2 at long t.
  t = 8192
  got = flops.nsa_attended(t, compress_block=64, compress_stride=32, select_block=64, num_selected=4, window=128)
  assert abs(got["slc"] / t - 4 * 64) < 64 and abs(got["win"] / t - 128) < 2
  assert abs(got["cmp"] / t - t / 2 / 32) < 4


def test_moe_router_active_and_shared_experts():
  c = small()
  c.ffn.kind = "moe"
  c.moe.update(num_experts=8, top_k=2, expert_dim=32, num_shared_experts=1)
  attn = T * (2 * D * 64 + 2 * 2 * D * 32 + 2 * 64 * D) + CAUSAL_PAIRS * H * 4 * HD
  ffn = 2 * D * 8 + (2 + 1) * 3 * 2 * D * 32  # router + 2 routed + 1 shared SwiGLU experts
  fwd = L * (attn + T * ffn) + T * HEAD
  assert flops.training_flops_per_step(c) == per_step(fwd)


def test_dense_attention_mode_counts_the_square():
  full = flops.forward_flops_per_sequence(small(), dense_attention=True)
  assert full["attention_core"] == L * T * T * H * 4 * HD


@pytest.mark.parametrize("kind,expected", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H200", 989.5e12), ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 SXM5 80GB", 989.5e12),  # an unlisted board string falls back to its family
])
def test_peak_table(kind, expected):
  assert flops.peak_flops_per_device(kind)[0] == expected


def test_peak_unknown_and_override():
  value, reason = flops.peak_flops_per_device("cpu")
  assert value is None and "device_kind 'cpu'" in reason and "metrics.peak_flops" in reason
  assert flops.peak_flops_per_device("cpu", 1e12) == (1e12, "metrics.peak_flops")


def test_unknown_kind_is_a_clear_error():
  with pytest.raises(ValueError, match="attention.kind='foo' has no FLOP count"):
    flops.training_flops_per_step(small("foo"))
