"""MQA: all query heads share one K/V head (model.num_kv_heads = 1).

Usage: --config=configs/attention/mqa.py:1.5B  (tiny | 0.5B | 1.5B | 3B; micro-batch and seq 8192 from base)
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.attention.kind = "mqa"
  c.model.num_kv_heads = 1
  return c
