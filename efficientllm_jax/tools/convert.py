"""Qwen2 / Qwen2.5 Hugging Face checkpoints <-> this project's parameters, in numpy (no torch).

HF stores `nn.Linear` weights as [out, in] and computes x @ W.T + b; our projections are LinearGeneral kernels
[in, *out] with the head axes split out: q [embed, heads, head_dim], o [heads, head_dim, embed]. Layers are
stacked on a leading axis (the nnx.scan layout), which is also how `import_hf` stores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np

# config.json keys -> our model keys
HF_MODEL_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "intermediate_size": "ffn_dim",
    "rms_norm_eps": "rms_eps",
}


class ConversionError(ValueError):
  """The HF checkpoint is not one this model can represent; str(err) is the one line to show."""


def read_hf_config(hf_dir: Path) -> dict:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{hf_dir} has no config.json: pass the directory of a Hugging Face Qwen2/Qwen2.5 model")
  hf = json.loads(path.read_text())
  kind = hf.get("model_type")
  if kind not in ("qwen2",):
    raise ConversionError(f"{path}: model_type={kind!r}; only Qwen2 / Qwen2.5 (model_type 'qwen2') is supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{path}: hidden_act={hf['hidden_act']!r}; the model's SwiGLU uses silu")
  for key in ("rope_scaling", "rope_parameters"):  # transformers 5 writes rope_parameters (rope_scaling aliases it)
    rope = hf.get(key) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or rope.get("partial_rotary_factor", 1) != 1:
      raise ConversionError(f"{path}: {key}={rope!r} is not implemented (plain full-width RoPE only)")
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
    raise ConversionError(f"{path}: use_sliding_window=true (per-layer windows) is not implemented")
  if not hf.get("tie_word_embeddings", False):
    raise ConversionError(f"{path}: tie_word_embeddings=false (a separate lm_head, e.g. Qwen2.5-7B) is not "
                          "supported: the model's LM head is the embedding")
  return hf


def model_fields(cfg) -> dict:
  """The config fields an imported checkpoint fixes (compared on load)."""
  m = cfg.model
  return {"model": {"vocab_size": m.vocab_size, "hidden": m.hidden, "num_layers": m.num_layers,
                    "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                    "ffn_dim": m.ffn_dim, "rms_eps": float(m.rms_eps), "qkv_bias": bool(m.qkv_bias),
                    "tie_embeddings": bool(m.tie_embeddings)},
          "position": {"kind": cfg.position.kind, "rope_theta": float(cfg.position.rope_theta),
                       "rope_fraction": float(cfg.position.rope_fraction)},
          "attention": {"kind": cfg.attention.kind, "window": int(cfg.attention.window)},
          "ffn": {"kind": cfg.ffn.kind}}


def fields_from_hf(hf: dict) -> dict:
  """`model_fields` of the model that reproduces the HF config."""
  m = {ours: hf[theirs] for theirs, ours in HF_MODEL_KEYS.items()}
  m["rms_eps"] = float(m["rms_eps"])
  m["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  m["qkv_bias"], m["tie_embeddings"] = True, True
  h, kv = m["num_heads"], m["num_kv_heads"]
  kind = "mha" if kv == h else "mqa" if kv == 1 else "gqa"
  # transformers < 5 writes rope_theta at the top level, 5 inside rope_parameters
  theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
  return {"model": m, "position": {"kind": "rope", "rope_theta": float(theta), "rope_fraction": 1.0},
          "attention": {"kind": kind, "window": 0}, "ffn": {"kind": "dense"}}


def apply_fields(cfg: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  with cfg.unlocked():
    for section, values in fields.items():
      for k, v in values.items():
        cfg[section][k] = v
  return cfg


def config_for(fields: dict, base_size: str = "0.5B") -> ml_collections.ConfigDict:
  """configs/base.py:<base_size> (training recipe) with the model fields of an imported checkpoint; fp32 params."""
  from configs import base
  cfg = apply_fields(base.get_config(base_size), fields)
  m = cfg.model
  same = [k for k, s in base.SIZES.items() if (s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"],
                                                s["ffn"]) == (m.hidden, m.num_layers, m.num_heads, m.num_kv_heads,
                                                              m.head_dim, m.ffn_dim)]
  cfg.size = same[0] if same else "custom"
  return cfg


# --- parameters ---------------------------------------------------------------------------------------------------

def _layer(tensors: dict, i: int, name: str) -> np.ndarray:
  key = f"model.layers.{i}.{name}"
  if key not in tensors:
    raise ConversionError(f"the checkpoint has no tensor {key!r}: it is not a complete Qwen2 checkpoint")
  return tensors[key]


def hf_to_params(tensors: dict[str, np.ndarray], fields: dict) -> dict:
  """Our parameters (pure nested dict, layers stacked, float32) from HF tensors named as in Qwen2ForCausalLM."""
  m = fields["model"]
  d, h, kv, hd, f = m["hidden"], m["num_heads"], m["num_kv_heads"], m["head_dim"], m["ffn_dim"]
  f32 = lambda x: np.asarray(x, np.float32)

  def stack(name, fn):
    return np.stack([fn(f32(_layer(tensors, i, name))) for i in range(m["num_layers"])])

  blocks = {
      "attn_norm": {"scale": stack("input_layernorm.weight", lambda w: w)},
      "ffn_norm": {"scale": stack("post_attention_layernorm.weight", lambda w: w)},
      "attn": {
          "q": {"kernel": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, hd)),
                "bias": stack("self_attn.q_proj.bias", lambda b: b.reshape(h, hd))},
          "k": {"kernel": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
                "bias": stack("self_attn.k_proj.bias", lambda b: b.reshape(kv, hd))},
          "v": {"kernel": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
                "bias": stack("self_attn.v_proj.bias", lambda b: b.reshape(kv, hd))},
          "o": {"kernel": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d))},
      },
      "ffn": {
          "gate": {"kernel": stack("mlp.gate_proj.weight", lambda w: w.T)},
          "up": {"kernel": stack("mlp.up_proj.weight", lambda w: w.T)},
          "down": {"kernel": stack("mlp.down_proj.weight", lambda w: w.T)},
      },
  }
  for key in ("model.embed_tokens.weight", "model.norm.weight"):
    if key not in tensors:
      raise ConversionError(f"the checkpoint has no tensor {key!r}: it is not a complete Qwen2 checkpoint")
  embed = f32(tensors["model.embed_tokens.weight"])
  if "lm_head.weight" in tensors and not np.array_equal(f32(tensors["lm_head.weight"]), embed):
    raise ConversionError("lm_head.weight differs from model.embed_tokens.weight although the config ties them")
  if embed.shape != (m["vocab_size"], d):
    raise ConversionError(f"model.embed_tokens.weight has shape {embed.shape}, config.json says "
                          f"({m['vocab_size']}, {d})")
  return {"embed": {"embedding": embed}, "blocks": blocks, "final_norm": {"scale": f32(tensors["model.norm.weight"])}}


def stacked_abstract(cfg) -> dict:
  """ShapeDtypeStructs (float32) of our parameters in the stacked-layers layout, whatever model.scan_layers is."""
  import jax
  from flax import nnx

  from efficientllm_jax.models.transformer import Transformer
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.model.scan_layers, c.model.param_dtype = True, "float32"
  pure = nnx.state(nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), pure)


def to_model_layout(cfg, pure: dict) -> dict:
  """Stacked layers -> {0: layer 0, 1: ...} when the model runs a Python list of blocks (model.scan_layers=False)."""
  if cfg.model.scan_layers:
    return pure
  import jax
  n = cfg.model.num_layers
  return {**pure, "blocks": {i: jax.tree.map(lambda x, i=i: x[i], pure["blocks"]) for i in range(n)}}


# --- safetensors --------------------------------------------------------------------------------------------------

def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
  """Every tensor of the *.safetensors files in `hf_dir`, as numpy (bf16 widened to float32)."""
  from safetensors import safe_open
  files = sorted(Path(hf_dir).glob("*.safetensors"))
  if not files:
    raise ConversionError(f"{hf_dir} has no *.safetensors files (this importer reads safetensors only)")
  out = {}
  for path in files:
    bf16 = []
    with safe_open(str(path), framework="np") as f:
      for name in f.keys():
        if f.get_slice(name).get_dtype() == "BF16":
          bf16.append(name)  # numpy has no bfloat16: read below
        else:
          out[name] = f.get_tensor(name)
    if bf16:
      out.update(_read_bf16(path, bf16))
  return out


def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
  """bf16 tensors from the safetensors layout (8-byte header length, JSON header, raw data), as float32."""
  import ml_dtypes
  raw = np.memmap(path, dtype=np.uint8, mode="r")
  n = int(np.frombuffer(raw[:8].tobytes(), "<u8")[0])
  header = json.loads(raw[8:8 + n].tobytes())
  out = {}
  for name in names:
    info = header[name]
    lo, hi = info["data_offsets"]
    x = np.frombuffer(raw[8 + n + lo: 8 + n + hi].tobytes(), ml_dtypes.bfloat16)
    out[name] = x.reshape(info["shape"]).astype(np.float32)
  return out
