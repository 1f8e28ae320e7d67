"""MoE sweep: a Qwen2.5 size with every FFN replaced by 8 SwiGLU experts of that size's FFN width, top-2, dropless.

Usage: --config=configs/moe/moe.py:0.5Bx8  (presets: tiny, 0.5Bx8, 1.5Bx8)
  0.5Bx8: the 0.5B model, 8 experts of width 4864, micro-batch 4, seq 8192.
  1.5Bx8: the 1.5B model, 8 experts of width 8960, micro-batch 2, seq 8192.
Router, losses and dispatch: efficientllm_jax/models/moe.py; keys: configs/base.py section `moe`.
"""

from configs import base

# preset -> (base size, experts, micro-batch); expert width = the base size's FFN width.
PRESETS = {"tiny": ("tiny", 8, 8), "0.5Bx8": ("0.5B", 8, 4), "1.5Bx8": ("1.5B", 8, 2)}


def get_config(arg: str = "tiny"):
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}: use one of {', '.join(PRESETS)} (e.g. configs/moe/moe.py:0.5Bx8)")
  size, experts, micro_batch = PRESETS[arg]
  c = base.get_config(size)
  c.size = arg
  c.ffn.kind = "moe"
  c.moe.num_experts = experts
  c.moe.top_k = 2
  c.moe.expert_dim = base.SIZES[size]["ffn"]
  c.moe.capacity_factor = 0.0  # dropless
  c.moe.aux_loss_coef = 0.01  # Switch form, as the EfficientLLM (Megatron) scripts
  c.train.micro_batch = micro_batch
  return c
