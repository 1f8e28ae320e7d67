"""bench/profile.py: device-time breakdown from a jax.profiler (perfetto / Chrome) trace."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientllm_jax.bench import profile


@pytest.mark.parametrize("name,hlo_op,want", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "", "matmul"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT", "dot.12", "matmul"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "", "collective"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "", "attention"),
    ("flash_fwd", "custom-call.3", "attention"),
    ("loop_multiply_fusion_2", "multiply_fusion.2", "fusion"),
    ("input_reduce_fusion", "", "fusion"),
    ("Memcpy DtoD", "", "memcpy"),
    ("some_custom_thing", "", "other"),
])
def test_category(name, hlo_op, want):
  assert profile.category(name, hlo_op) == want


def _trace(tmp_path):
  """Two GPUs, one host; per-device kernels with an overlap (a second stream) and an idle gap."""
  meta = [{"ph": "M", "pid": p, "name": "process_name", "args": {"name": n}}
          for p, n in ((1, "/host:CPU"), (2, "/device:GPU:0"), (3, "/device:GPU:1"))]
  x = lambda pid, ts, dur, name: {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name}  # noqa: E731
  events = meta + [
      x(1, 0, 5000, "PjitFunction(train_step)"),  # host: ignored
      x(2, 0, 600, "sm90_xmma_gemm_bf16"), x(2, 400, 400, "ncclDevKernel_AllReduce"),  # overlap 400..600
      x(2, 1000, 200, "loop_add_fusion"),  # gap 800..1000
      x(3, 0, 1000, "cudnn_sdpa_fprop"), x(3, 1000, 200, "loop_add_fusion"),
  ]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return path


def test_summarize_against_hand_computed(tmp_path):
  s = profile.summarize(_trace(tmp_path), steps=2)
  # Per step and per device: (sum of durations) / (2 devices x 2 steps), microseconds -> ms.
  assert s["devices"] == 2
  assert s["device_ms_per_step"] == pytest.approx(
      {"attention": 0.25, "matmul": 0.15, "collective": 0.1, "fusion": 0.1})
  # Busy = union of intervals: GPU0 0..800 + 1000..1200 = 1000 us, GPU1 0..1200 = 1200 us; spans 1200 each.
  assert s["busy_ms_per_step"] == pytest.approx(2200 / 4 / 1e3)
  assert s["span_ms_per_step"] == pytest.approx(2400 / 4 / 1e3)
  assert s["idle_fraction"] == pytest.approx(1 - 2200 / 2400, abs=1e-4)
  assert s["top_kernels"][0] == ("cudnn_sdpa_fprop", "attention", 0.25)
  text = profile.format_summary(s)
  assert "idle 8.3 %" in text and "attention" in text


def test_summarize_real_cpu_trace(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((256, 256)), jnp.float32) for _ in range(2))
  f(a, b).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(a, b).block_until_ready()
  s = profile.summarize(profile.find_trace(tmp_path), steps=3)
  assert s["devices"] >= 1 and s["top_kernels"]
  assert 0 < s["busy_ms_per_step"] <= s["span_ms_per_step"]


def test_missing_trace_and_empty_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz"):
    profile.find_trace(tmp_path)
  with pytest.raises(ValueError, match="no kernel events"):
    profile.summarize({"traceEvents": [{"ph": "X", "pid": 1, "ts": 0, "dur": 5, "name": "host"}]}, steps=1)
