"""NSA (native sparse attention, models/attention/nsa.py) on the Qwen2.5 decoder.

Usage: --config=configs/attention/nsa.py:1.5B        EfficientLLM setting (base defaults): compress block l 64,
                                                     stride d 32, select block l' 64, n 4 selected, window w 128
       --config=configs/attention/nsa.py:1.5B,paper  the NSA paper's setting: l 32, d 16, l' 64, n 16, w 512
Sizes: tiny | 0.5B | 1.5B | 3B (micro-batch 4 / 2 / 1 and seq 8192 from configs/base.py). Both settings always
select the first block and 2 local blocks (attention.nsa.local_blocks), counted in n.
"""

from configs import base

PAPER = dict(compress_block=32, compress_stride=16, select_block=64, num_selected=16, window=512)
SETTINGS = ("efficientllm", "paper")


def get_config(arg: str = "tiny"):
  size, _, setting = arg.partition(",")
  setting = setting or "efficientllm"
  if setting not in SETTINGS:
    raise ValueError(f"unknown NSA setting {setting!r} in {arg!r}: use SIZE or SIZE,paper (e.g. 1.5B,paper)")
  c = base.get_config(size)
  c.attention.kind = "nsa"
  if setting == "paper":
    c.attention.nsa.update(PAPER)
  return c
