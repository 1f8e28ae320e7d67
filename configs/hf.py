"""Train from an imported Hugging Face checkpoint: --config=configs/hf.py:CKPT (CKPT from tools.import_hf).

The model section comes from CKPT/model_config.json, the training recipe from configs/base.py:0.5B, and
init.checkpoint=CKPT. The data must use the checkpoint's tokenizer: prepare it with
`python -m efficientllm_jax.data.prepare --tokenizer=CKPT ...` and pass --config.data.path=DIR.
"""

import json
from pathlib import Path

from efficientllm_jax.tools import convert


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("configs/hf.py needs the imported checkpoint: --config=configs/hf.py:CKPT")
  path = Path(arg).expanduser() / "model_config.json"
  if not path.is_file():
    raise ValueError(f"{path} not found: write CKPT with python -m efficientllm_jax.tools.import_hf --out=CKPT")
  c = convert.config_for(json.loads(path.read_text()))
  c.init.checkpoint = str(arg)
  c.data.source = "arrayrecord"
  return c
