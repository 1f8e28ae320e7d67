"""Positional sweep: ALiBi (Press et al.): per-head linear distance penalty on the attention logits, no embedding.

Usage: --config=configs/positional/alibi.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "alibi"
  return c
