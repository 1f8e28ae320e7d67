"""Qwen2.5-0.5B-shaped parity check: a random-initialised Qwen2ForCausalLM saved by Hugging Face transformers,
imported with tools.import_hf, must give the same fp32 logits (max |ours - theirs| / max |theirs| < 1e-4).

  python benchmarks/hf_parity_0_5b.py [--seq_len=64] [--keep=DIR]

Needs torch + transformers (prints SKIP and exits 0 without them). Transformers runs on the CPU in fp32 (no TF32);
JAX runs on its default device with fp32 matmuls at 'highest' precision and the XLA attention path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu")
ROPE_THETA = 1e6
TOLERANCE = 1e-4


def transformers_logits(hf_dir: Path, seq_len: int):
  import inspect

  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = False
  rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}  # transformers >= 5
          if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters else {"rope_theta": ROPE_THETA})
  model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, **rope, attn_implementation="eager")).float().eval()
  with torch.no_grad():  # non-zero biases and norm scales, so every tensor matters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.02)
  model.save_pretrained(hf_dir, safe_serialization=True)
  ids = torch.randint(0, QWEN25_05B["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    return ids.numpy(), model(input_ids=ids).logits.float().numpy()


def our_logits(ckpt: Path, ids: np.ndarray) -> np.ndarray:
  import jax
  from flax import nnx

  from configs import hf as hf_config
  from efficientllm_jax.models.transformer import Transformer
  from efficientllm_jax.train import checkpoint
  jax.config.update("jax_default_matmul_precision", "highest")
  cfg = hf_config.get_config(str(ckpt))
  cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat, cfg.attention.impl = "float32", "float32", "none", "xla"
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), params)
  params = checkpoint.load_init_params(cfg, params)
  return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids))


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--keep", default="", help="keep the HF and imported checkpoints in this directory")
  args = ap.parse_args()
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    print(f"SKIP: {e.name} is not installed (pip install torch transformers)")
    return 0
  import jax

  from efficientllm_jax.tools import import_hf
  root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hf_parity_"))
  t0 = time.perf_counter()
  ids, want = transformers_logits(root / "hf", args.seq_len)
  t1 = time.perf_counter()
  import_hf.import_checkpoint(root / "hf", root / "ckpt", overwrite=True)
  t2 = time.perf_counter()
  got = our_logits(root / "ckpt", ids)
  t3 = time.perf_counter()
  err = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
  ok = err < TOLERANCE
  print(f"Qwen2.5-0.5B shape, random init, logits {want.shape}: max |ours - transformers| / max |transformers| = "
        f"{err:.2e} (tolerance {TOLERANCE:g}) -> {'PASS' if ok else 'FAIL'} | transformers {t1 - t0:.1f}s, "
        f"import {t2 - t1:.1f}s, ours {t3 - t2:.1f}s on {jax.devices()[0].device_kind}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
