"""MLA (DeepSeek-V2 multi-head latent attention) with the suite's settings from base: kv_lora_rank = hidden/8
(EfficientLLM), no query compression (q_lora_rank 0, as V2-Lite), qk_rope_head_dim 64, qk_nope_head_dim =
v_head_dim = the model's head dim. Override any of them, e.g. --config.attention.mla.q_lora_rank=768.

Usage: --config=configs/attention/mla.py:1.5B  (tiny | 0.5B | 1.5B | 3B; micro-batch and seq 8192 from base)
"""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.attention.kind = "mla"
  return c
