"""Positional sweep: RoPE (Su et al.), Qwen2.5's own scheme: theta 1e6 over the whole head dim (the sweep's baseline).

Usage: --config=configs/positional/rope.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "rope"
  return c
