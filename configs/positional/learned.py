"""Positional sweep: learned absolute position table of position.max_len rows (>= data.seq_len) added to
the token embeddings (GPT-2 style).

Usage: --config=configs/positional/learned.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "learned"
  return c
