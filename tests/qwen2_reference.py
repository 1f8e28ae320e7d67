"""A plain-numpy (float64) Qwen2ForCausalLM forward written from the Hugging Face model's definition, reading the
safetensors tensor names directly; the independent reference the importer is tested against. Also a writer of
random Qwen2-shaped checkpoints (safetensors + config.json) for those tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def qwen2_logits(tensors: dict, hf: dict, ids: np.ndarray) -> np.ndarray:
  """ids [B, T] -> logits [B, T, vocab] (float64)."""
  w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  n_h, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = hf.get("head_dim") or hf["hidden_size"] // n_h
  eps = hf["rms_norm_eps"]
  b, t = ids.shape
  theta = hf["rope_theta"] if "rope_theta" in hf else hf["rope_parameters"]["rope_theta"]  # transformers 4 / 5
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  freqs = np.arange(t)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]
  cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]  # broadcast over [B, H, T, hd]
  causal = np.tril(np.ones((t, t), bool))

  x = w["model.embed_tokens.weight"][ids]
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

    def proj(name, heads):
      y = h @ w[p + f"self_attn.{name}_proj.weight"].T + w[p + f"self_attn.{name}_proj.bias"]
      return y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)  # [B, heads, T, hd]

    q, k, v = proj("q", n_h), proj("k", n_kv), proj("v", n_kv)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, n_h // n_kv, axis=1), np.repeat(v, n_h // n_kv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, n_h * hd)
    x = x + attn @ w[p + "self_attn.o_proj.weight"].T
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  x = rms_norm(x, w["model.norm.weight"], eps)
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T


def tiny_hf_config(**over) -> dict:
  cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 512,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
         "use_sliding_window": False, "rope_scaling": None, "max_position_embeddings": 128}
  cfg.update(over)
  return cfg


def random_qwen2_tensors(hf: dict, seed: int = 0, *, lm_head: bool = False) -> dict[str, np.ndarray]:
  """Every tensor of a Qwen2ForCausalLM with random values (biases and norm scales included, none zero)."""
  rng = np.random.default_rng(seed)
  d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  h, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = hf.get("head_dim") or d // h
  n = lambda *shape, s=0.08: rng.normal(0.0, s, shape).astype(np.float32)
  t = {"model.embed_tokens.weight": n(v, d, s=0.5), "model.norm.weight": 1 + n(d, s=0.2)}
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": 1 + n(d, s=0.2), p + "post_attention_layernorm.weight": 1 + n(d, s=0.2),
          p + "self_attn.q_proj.weight": n(h * hd, d), p + "self_attn.q_proj.bias": n(h * hd, s=0.3),
          p + "self_attn.k_proj.weight": n(kv * hd, d), p + "self_attn.k_proj.bias": n(kv * hd, s=0.3),
          p + "self_attn.v_proj.weight": n(kv * hd, d), p + "self_attn.v_proj.bias": n(kv * hd, s=0.3),
          p + "self_attn.o_proj.weight": n(d, h * hd), p + "mlp.gate_proj.weight": n(f, d),
          p + "mlp.up_proj.weight": n(f, d), p + "mlp.down_proj.weight": n(d, f)}
  if lm_head:
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  return t


def write_hf_dir(path: Path, hf: dict, tensors: dict) -> Path:
  from safetensors.numpy import save_file
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf))
  save_file(tensors, str(path / "model.safetensors"))
  return path
