"""Positional sweep: T5 relative position bias, a learned per-head scalar per log-spaced causal distance
bucket (position.num_buckets 32, position.max_distance 128), one table shared by all layers as in T5.

Usage: --config=configs/positional/relative.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "relative"
  return c
