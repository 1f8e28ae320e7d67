"""Every EfficientLLM metric from a scripted timeline on the fake two-GPU machine, against hand-computed values."""

from __future__ import annotations

import json
import math

import jax
import pytest

from configs import base
from efficientllm_jax import config as config_lib
from efficientllm_jax.metrics import efficiency as eff_lib
from efficientllm_jax.metrics.monitor import DeviceMonitor
from metrics_fakes import Clock, FakeDevice, install_fake_nvml

COUNTS = {"total": 1_000_000, "embedding": 200_000, "non_embedding": 800_000}


def cfg_small(**metrics):
  c = base.get_config("tiny")  # micro_batch 8 x seq 128 = 1024 tokens / step
  c.train.steps = 6
  c.metrics.update(metrics)
  return c


def run_timeline(tmp_path, monkeypatch, cfg, counts=COUNTS, **fake):
  """Created at t=0; steps 0..3 done at 1, 2, 2.5, 3; eval 3..5; step 4 done at 6; finish at 6.

  With warm-up 2 (the compile step 0 and step 1), the measured steps are 2, 3 (0.5 s each) and 4 (1 s, timed from
  the end of eval), and the energy / sample window is [2, 3] + [5, 6].
  """
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock, **fake)
  devs = [FakeDevice(0, "A", clock), FakeDevice(1, "B", clock)]
  mon = DeviceMonitor(devs, interval_s=3600, clock=clock)
  e = eff_lib.Efficiency(cfg, counts, workdir=tmp_path, monitor=mon, clock=clock, devices=devs)

  def at(t):
    clock.t = t
    return t

  # what jax reports while compiling (jax.monitoring): the train step traced 1 s + compiled 4 s, eval 2 s
  record = jax.monitoring.record_event_duration_secs
  record("/jax/core/compile/jaxpr_trace_duration", 1.0, fun_name="train_step")
  record("/jax/core/compile/backend_compile_duration", 4.0, fun_name="jit(train_step)")
  record("/jax/core/compile/backend_compile_duration", 2.0, fun_name="jit(eval_step)")
  for step, t in enumerate([1.0, 2.0, 2.5, 3.0]):
    e.step_done(step, at(t))
  at(3.0)
  e.pause()
  e.resume(at(5.0))
  e.step_done(4, at(6.0))
  s = e.finish(eval_loss=2.0, final_loss=1.5)
  e.close()
  return s


def test_timings_throughput_and_mfu(tmp_path, monkeypatch):
  s = run_timeline(tmp_path, monkeypatch, cfg_small())
  assert s["measured_steps"] == 3 and s["warmup_steps_excluded"] == 2
  al = (0.5 + 0.5 + 1.0) / 3
  assert s["AL_s"] == pytest.approx(al)
  assert s["tokens_per_s"] == pytest.approx(1024 / al)
  assert s["tokens_per_s_per_device"] == pytest.approx(1024 / al / 2)
  assert s["TT"] == pytest.approx(1024 / al / 1_000_000)
  assert s["ST"] == pytest.approx(8 / al / 1_000_000)
  assert s["TT_params"] == "total" and "TT_active" not in s
  assert s["MFU"] == pytest.approx(s["flops_per_step"] / (al * 989.5e12 * 2))
  assert s["wall_s"] == 6.0 and s["gpu_hours"] == pytest.approx(6.0 / 3600 * 2)
  assert s["PPL"] == pytest.approx(math.exp(2.0)) and s["final_loss"] == 1.5
  assert s["compile_s"] == 5.0 and s["compile_total_s"] == 7.0 and s["train_step_compiles"] == 1


def test_energy_power_memory_utilisation(tmp_path, monkeypatch):
  s = run_timeline(tmp_path, monkeypatch, cfg_small())
  # Counter: A rises 300 W, B 150 W, over a 2 s window (eval's 2 s cut out).
  assert s["AEC_W_per_device"] == pytest.approx([300.0, 150.0])
  assert s["AEC_W_total"] == pytest.approx(450.0)
  assert s["energy_J_total"] == pytest.approx(900.0)
  assert s["J_per_token"] == pytest.approx(900.0 / (3 * 1024))
  # Sampled power: A = 200 + 100 t integrates to 450 J over [2,3] and 750 J over [5,6]; B = 100 W.
  assert s["AEC_W_per_device_from_power"] == pytest.approx([600.0, 100.0])
  assert s["energy_J_total_from_power"] == pytest.approx(1200.0 + 200.0)
  assert s["energy_counter_vs_power_rel_diff"] == pytest.approx((900.0 - 1400.0) / 1400.0)
  # Memory A = 10e9 + 2e9 t averages 15e9 over [2,3] and 21e9 over [5,6]; B = 4e9.
  assert s["AMU_GB_per_device"] == pytest.approx([18.0, 4.0])
  assert s["AMU_GB"] == pytest.approx(11.0)
  assert s["peak_memory_GB"] == pytest.approx(30.0) and s["peak_memory_GB_per_device"] == pytest.approx([30, 5])
  # Utilisation A = 50 + 5 t: 62.5 % then 77.5 %; B = 100 %.
  assert s["PCU_per_device"] == pytest.approx([0.70, 1.0])
  assert s["PCU"] == pytest.approx(0.85)
  assert s["power_limit_W_per_device"] == [700.0, 700.0]


def test_summary_json_has_every_key_number_or_null_with_reason(tmp_path, monkeypatch):
  run_timeline(tmp_path, monkeypatch, cfg_small(), energy_supported=False)
  s = json.loads((tmp_path / "summary.json").read_text())
  for key in eff_lib.SUMMARY_KEYS:
    assert key in s, key
    if s[key] is None:
      assert isinstance(s.get(f"{key}_null_reason"), str) and s[f"{key}_null_reason"], key
  assert set(s["params"]) == {"total", "embedding", "non_embedding"}
  for key in ("AEC_W_per_device", "AEC_W_total", "J_per_token"):
    assert s[key] is None and "nvmlDeviceGetTotalEnergyConsumption failed" in s[f"{key}_null_reason"]
  assert s["AEC_W_total_from_power"] == pytest.approx(700.0)  # the power samples still measured
  assert s["status"] == "ok"


def test_warmup_steps_is_configurable_and_compile_step_always_excluded(tmp_path, monkeypatch):
  s = run_timeline(tmp_path, monkeypatch, cfg_small(warmup_steps=0))
  # warm-up 0 still drops the compile step: steps 1 (1 s), 2, 3 (0.5 s) and 4 (1 s) are measured.
  assert s["measured_steps"] == 4 and s["AL_s"] == pytest.approx(3.0 / 4)
  s = run_timeline(tmp_path, monkeypatch, cfg_small(warmup_steps=5))
  assert s["AL_s"] is None and "no measured steps" in s["AL_s_null_reason"]
  assert s["MFU"] is None and s["AEC_W_total"] is None and "no measured steps" in s["AEC_W_total_null_reason"]


def test_moe_reports_active_parameter_versions(tmp_path, monkeypatch):
  c = cfg_small()
  c.ffn.kind = "moe"
  idle = 2 * (8 - 2) * 3 * 128 * 384  # layers x idle experts x SwiGLU(hidden 128, expert_dim 384)
  s = run_timeline(tmp_path, monkeypatch, c, counts=dict(COUNTS, active=1_000_000 - idle))  # as param_counts gives
  assert s["params"]["active"] == 1_000_000 - idle
  assert s["TT_active"] == pytest.approx(s["tokens_per_s"] / (1_000_000 - idle))
  assert s["ST_active"] == pytest.approx(8 / s["AL_s"] / (1_000_000 - idle))


def test_peak_override_and_unknown_device(tmp_path, monkeypatch):
  s = run_timeline(tmp_path, monkeypatch, cfg_small(peak_flops=1e15))
  assert s["peak_flops_per_device"] == 1e15 and s["peak_flops_source"] == "metrics.peak_flops"
  monkeypatch.setattr(FakeDevice, "device_kind", "Mystery Accelerator")
  s = run_timeline(tmp_path, monkeypatch, cfg_small())
  assert s["MFU"] is None and "Mystery Accelerator" in s["MFU_null_reason"]


def test_interval_scalars_for_tensorboard(tmp_path, monkeypatch):
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  devs = [FakeDevice(0, "A", clock), FakeDevice(1, "B", clock)]
  e = eff_lib.Efficiency(cfg_small(), COUNTS, monitor=DeviceMonitor(devs, interval_s=3600, clock=clock),
                         clock=clock, devices=devs)
  for step, t in enumerate([1.0, 1.5, 2.5]):
    clock.t = t
    e.step_done(step, t)
    e.monitor.read()
  m = e.interval_scalars(2.5)
  e.close()
  assert m["step_time"] == pytest.approx(0.75) and m["tokens_per_s"] == pytest.approx(1024 / 0.75)
  # time averages over [0, 2.5] of linear traces = their value at t = 1.25: power A 325 + B 100
  assert m["power_W_total"] == pytest.approx(425.0)
  assert m["util_pct"] == pytest.approx(((50 + 5 * 1.25) + 100) / 2)
  assert m["memory_GB"] == pytest.approx(((10 + 2 * 1.25) + 4) / 2)


def test_failed_run_still_writes_summary(tmp_path, monkeypatch):
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  devs = [FakeDevice(0, "A", clock)]
  with pytest.raises(RuntimeError, match="boom"):
    with eff_lib.Efficiency(cfg_small(), COUNTS, workdir=tmp_path, clock=clock, devices=devs,
                            monitor=DeviceMonitor(devs, interval_s=3600, clock=clock)) as e:
      e.step_done(0, 1.0)
      raise RuntimeError("boom")
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["status"] == "failed: RuntimeError: boom" and s["AL_s"] is None


def test_console_lines_show_nulls_with_reasons():
  s = {"AL_s": 0.5, "tokens_per_s": 2048.0, "MFU": None, "MFU_null_reason": "no peak",
       "AEC_W_total": None, "AEC_W_total_null_reason": "no NVML", "J_per_token": None,
       "J_per_token_null_reason": "no NVML"}
  lines = eff_lib.console_lines(s)
  assert "AL 0.5000 s" in lines[0] and "MFU null" in lines[0] and "tok/s 2,048" in lines[0]
  assert "  null MFU: no peak" in lines and "  null AEC_W_total, J_per_token: no NVML" in lines


@pytest.mark.parametrize("key,value,message", [
    ("metrics.sample_interval_s", 0.0, "metrics.sample_interval_s=0.0 must be > 0"),
    ("metrics.warmup_steps", -1, "metrics.warmup_steps=-1 must be an integer >= 0"),
    ("metrics.peak_flops", -5.0, "metrics.peak_flops=-5.0 must be a number >= 0"),
    ("profile.num_steps", 10, "profile.start_step=5 + profile.num_steps=10 runs past train.steps=6"),
])
def test_config_mistakes_are_one_line_errors(key, value, message):
  c = cfg_small()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match="^" + message.replace("+", r"\+").replace(".", r"\.")):
    config_lib.validate(c)


def test_acceptance_check_flags_implausible_numbers(tmp_path, monkeypatch):
  from efficientllm_jax.metrics import check
  good = run_timeline(tmp_path, monkeypatch, cfg_small())
  # the scripted machine: counter and power disagree by -36 %, everything else is plausible
  assert check.problems(good) == ["energy counter and power x time differ by -35.7% (tolerance 10%)"]
  assert check.problems(good, energy_tolerance=0.4) == []
  bad = dict(good, MFU=1.3, AEC_W_per_device=[800.0, 150.0], AMU_GB=90.0, PCU=None, PCU_null_reason="no NVML",
             train_step_compiles=2)
  found = check.problems(bad, energy_tolerance=0.4)
  assert "PCU is null: no NVML" in found and "MFU=1.3000 is outside (0, 1)" in found
  assert "device 0: AEC 800 W is not under its power limit 700 W" in found
  assert "AMU_GB=90.00 exceeds the device memory 80.00 GB" in found
  assert any("compiled 2 times" in p for p in found)
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  assert check.main(["check", str(tmp_path / "bad.json")]) == 1


def test_profiler_trace_writing_is_cut_out_of_the_window(tmp_path, monkeypatch):
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  devs = [FakeDevice(0, "A", clock)]
  c = cfg_small(warmup_steps=1)
  c.profile.update(start_step=1, num_steps=1)
  e = eff_lib.Efficiency(c, COUNTS, workdir=tmp_path, clock=clock, devices=devs,
                         monitor=DeviceMonitor(devs, interval_s=3600, clock=clock))
  traces = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: traces.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: (traces.append(("stop",)), setattr(clock, "t", 9.0)))
  for step, t in enumerate([1.0, 2.0, 10.0]):  # stopping the trace after step 1 takes 2 -> 9
    with e.annotate(step):
      pass
    clock.t = t
    e.step_done(step, t)
  s = e.finish(eval_loss=None, final_loss=None)
  e.close()
  assert traces == [("start", str(tmp_path / "tb")), ("stop",)]
  assert e.step_times == [1.0, 1.0]  # step 2 timed from 9, not from 2
  assert [(a.t, b.t) for a, b in e.segments] == [(1.0, 2.0), (9.0, 10.0)]
  assert s["AEC_W_per_device"] == pytest.approx([300.0])
