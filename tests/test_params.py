"""Parameter counts of the Qwen2.5 presets from abstract init (no allocation) equal the published totals."""

import pytest

from configs import base
from efficientllm_jax.models.transformer import param_counts

QWEN25 = {"0.5B": 494_032_768, "1.5B": 1_543_714_304, "3B": 3_085_938_688}


@pytest.mark.parametrize("size", list(QWEN25))
def test_qwen25_parameter_counts(size):
  counts = param_counts(base.get_config(size))
  assert counts["total"] == QWEN25[size]
  c = base.get_config(size).model
  assert counts["embedding"] == c.vocab_size * c.hidden
  assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_hand_count_per_layer():
  # One Qwen2 layer by hand: q/k/v with bias, o without, SwiGLU (3 matrices), two RMSNorm scales.
  m = base.get_config("0.5B").model
  q = m.hidden * m.num_heads * m.head_dim + m.num_heads * m.head_dim
  kv = 2 * (m.hidden * m.num_kv_heads * m.head_dim + m.num_kv_heads * m.head_dim)
  o = m.num_heads * m.head_dim * m.hidden
  mlp = 3 * m.hidden * m.ffn_dim
  layer = q + kv + o + mlp + 2 * m.hidden
  expected = m.vocab_size * m.hidden + m.num_layers * layer + m.hidden
  assert param_counts(base.get_config("0.5B"))["total"] == expected
