"""Positional sweep: Fixed sinusoidal absolute encoding added to the token embeddings (Vaswani et al.).

Usage: --config=configs/positional/sinusoidal.py:1.5B  (GQA 1.5B at 8K, micro-batch 2) or :tiny (CPU).
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.position.kind = "sinusoidal"
  return c
