"""GQA, the Qwen2.5 default: query heads share K/V heads in groups (model.num_kv_heads = 2 at every size).

Usage: --config=configs/attention/gqa.py:1.5B  (tiny | 0.5B | 1.5B | 3B; micro-batch and seq 8192 from base)
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.attention.kind = "gqa"
  c.model.num_kv_heads = base.SIZES[arg]["kv_heads"]
  return c
