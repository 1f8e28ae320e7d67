"""A tiny end-to-end run on CPU: the profiler writes an xplane file, summary.json carries every metric key with a
number or null + reason, TensorBoard/jsonl get the summary, and the console says why each null is null."""

from __future__ import annotations

import json

import pytest

from configs import base
from efficientllm_jax.metrics.efficiency import SUMMARY_KEYS
from efficientllm_jax.train.loop import train_and_evaluate


def tiny_cfg():
  c = base.get_config("tiny")
  c.model.update(num_layers=1, hidden=64, num_heads=2, num_kv_heads=1, head_dim=32, ffn_dim=128, vocab_size=512)
  c.data.update(seq_len=32, tokenizer="bytes", max_corpus_mb=0.2)
  c.train.update(steps=4, micro_batch=2, eval_every=0, eval_batches=1, log_every=2)
  c.metrics.warmup_steps = 1  # steps 1, 2, 3 measured
  c.profile.update(start_step=1, num_steps=2)
  return c


@pytest.mark.slow
def test_tiny_run_profiles_and_summarises(tmp_path, capfd):
  returned = train_and_evaluate(tiny_cfg(), tmp_path)
  out = capfd.readouterr().out

  traces = list((tmp_path / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0

  s = json.loads((tmp_path / "summary.json").read_text())
  assert s == json.loads(json.dumps(returned))
  for key in SUMMARY_KEYS:
    assert key in s, key
    v = s[key]
    if v is None:
      assert s[f"{key}_null_reason"], key
    elif key not in ("size", "attention", "position", "ffn", "device_kind"):
      assert isinstance(v, (int, float, list, dict)), (key, v)
  assert s["measured_steps"] == 3 and s["AL_s"] > 0 and s["tokens_per_s"] > 0 and s["compile_s"] > 0
  assert s["train_step_compiles"] == 1  # inspect_compiled's executable is the one the loop runs
  assert s["PPL"] > 1 and s["status"] == "ok"
  assert s["compiled_memory_GB"]["temp_GB"] >= 0

  # CPU: the unmeasurable figures are null, and the console line says why
  for key in ("MFU", "PCU", "AMU_GB", "AEC_W_total", "J_per_token", "gpu_hours"):
    assert s[key] is None, key
  assert "no NVIDIA GPU" in s["AEC_W_total_null_reason"] and "memory_stats() returns None" in s["AMU_GB_null_reason"]
  assert "MFU null" in out and "null MFU: no peak FLOP/s known for device_kind 'cpu'" in out

  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(r["split"] == "train" and "step_time" in r for r in rows)
  assert any(r["split"] == "summary" and r["AL_s"] == pytest.approx(s["AL_s"]) for r in rows)
