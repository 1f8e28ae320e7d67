"""Positional sweep: NoPE: no positional signal; causal masking is the only order information.

Usage: --config=configs/positional/none.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "none"
  return c
