"""MHA: every query head has its own K/V head (model.num_kv_heads = model.num_heads).

Usage: --config=configs/attention/mha.py:1.5B  (tiny | 0.5B | 1.5B | 3B; micro-batch and seq 8192 from base)
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.attention.kind = "mha"
  c.model.num_kv_heads = c.model.num_heads
  return c
