"""MoE sweep, dense side: the Qwen2.5 dense SwiGLU baselines beside the MoE models (configs/moe/moe.py).

Usage: --config=configs/moe/dense.py:1.5B  (presets: tiny, 1.5B, 3B; 0.5B is configs/base.py:0.5B)
"""

from configs import base

PRESETS = ("tiny", "1.5B", "3B")


def get_config(arg: str = "tiny"):
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}: use one of {', '.join(PRESETS)} (e.g. configs/moe/dense.py:1.5B)")
  c = base.get_config(arg)
  c.ffn.kind = "dense"
  return c
