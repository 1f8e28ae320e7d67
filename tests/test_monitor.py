"""The device sampler against a fake NVML: bus-id matching, units, null reasons, the background thread."""

from __future__ import annotations

import time

import jax
import pytest

from efficientllm_jax.metrics import monitor as monitor_lib
from efficientllm_jax.metrics.monitor import DeviceMonitor, normalize_bus_id
from metrics_fakes import Clock, FakeDevice, install_fake_nvml


def gpus(clock, **kw):
  return [FakeDevice(0, "A", clock, **kw), FakeDevice(1, "B", clock, **kw)]


def test_bus_id_formats_normalise_alike():
  assert normalize_bus_id("00000000:3B:00.0") == normalize_bus_id(b"0000:3b:00.0") == "0000:3b:00.0"
  assert normalize_bus_id(None) is None and normalize_bus_id("garbage") is None


def test_reads_each_device_through_its_own_handle_in_si_units(monkeypatch):
  clock = Clock(2.0)
  install_fake_nvml(monkeypatch, clock)
  mon = DeviceMonitor(gpus(clock), interval_s=3600, clock=clock)
  r = mon.read()
  # NVML enumerates B first; matching by bus id must still give A's numbers for JAX device 0.
  assert r.t == 2.0
  assert r.values["power_W"] == (400.0, 100.0)  # 200 + 100*2 W; mW converted
  assert r.values["energy_J"] == (5000.0 + 600.0, 5000.0 + 300.0)  # counter in J
  assert r.values["util"] == (60.0, 100.0)
  assert r.values["mem_bytes"] == (14e9, 4e9) and r.values["peak_bytes"] == (30e9, 5e9)
  assert all("PCI bus" in m and "device.pci_bus_id" in m for m in mon.match)
  assert mon.power_limit_W == [700.0, 700.0] and mon.memory_total_bytes == [80e9, 80e9]
  assert all(v is None for v in mon.reasons.values())


def test_without_bus_ids_falls_back_to_local_hardware_id_and_says_so(monkeypatch):
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  monkeypatch.setattr(monitor_lib, "cuda_bus_id", lambda ordinal: (None, "libcuda.so.1 unavailable (test)"))
  mon = DeviceMonitor(gpus(clock, with_bus_id=False), interval_s=3600, clock=clock)
  assert all("local_hardware_id" in m and "libcuda.so.1 unavailable" in m for m in mon.match)
  # index order now pairs JAX device 0 with NVML index 0 (= B): the note is the warning that this can be wrong
  assert mon.read().values["power_W"] == (100.0, 200.0)


def test_unsupported_energy_counter_is_null_with_reason(monkeypatch):
  clock = Clock(1.0)
  install_fake_nvml(monkeypatch, clock, energy_supported=False)
  mon = DeviceMonitor(gpus(clock), interval_s=3600, clock=clock)
  assert "nvmlDeviceGetTotalEnergyConsumption failed" in mon.reasons["energy_J"]
  r = mon.read()
  assert r.values["energy_J"] == (None, None) and r.values["power_W"] == (300.0, 100.0)


def test_nvml_init_failure_nulls_nvml_fields_only(monkeypatch):
  clock = Clock(1.0)
  install_fake_nvml(monkeypatch, clock, init_error=True)
  mon = DeviceMonitor(gpus(clock), interval_s=3600, clock=clock)
  for f in ("power_W", "util", "energy_J"):
    assert mon.reasons[f].startswith("nvmlInit failed")
  r = mon.read()
  assert r.values["power_W"] == (None, None) and r.values["mem_bytes"] == (12e9, 4e9)


def test_cpu_gives_reasons_not_numbers():
  mon = DeviceMonitor(jax.local_devices(), interval_s=3600)
  assert "memory_stats() returns None on platform cpu" in mon.reasons["mem_bytes"]
  assert "no NVIDIA GPU" in mon.reasons["power_W"]
  r = mon.read()
  assert all(v is None for vals in r.values.values() for v in vals)


def test_background_thread_samples_and_stops(monkeypatch):
  clock = Clock(0.0)
  calls = install_fake_nvml(monkeypatch, clock)
  mon = DeviceMonitor(gpus(clock), interval_s=0.01).start()
  deadline = time.time() + 10
  while len(mon.readings()) < 4 and time.time() < deadline:
    time.sleep(0.01)
  mon.stop()
  n = len(mon.readings())
  assert n >= 4 and mon._thread is None and calls[-1] == "shutdown"
  time.sleep(0.05)
  assert len(mon.readings()) == n  # nothing samples after stop()


def test_a_failing_sample_does_not_stop_the_thread(monkeypatch):
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  mon = DeviceMonitor(gpus(clock), interval_s=0.01)
  real, state = mon.read, {"n": 0}

  def flaky():
    state["n"] += 1
    if state["n"] == 2:
      raise RuntimeError("transient")
    return real()

  monkeypatch.setattr(mon, "read", flaky)
  mon.start()
  deadline = time.time() + 10
  while state["n"] < 5 and time.time() < deadline:
    time.sleep(0.01)
  mon.stop()
  assert state["n"] >= 5


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_real_gpu_matches_and_reads():
  from efficientllm_jax.metrics import flops
  x = jax.device_put(jax.numpy.ones((1024, 1024)), jax.local_devices()[0]).block_until_ready()
  mon = DeviceMonitor(interval_s=3600)
  first = mon.read()
  time.sleep(1.0)
  second = mon.read()
  mon.stop()
  assert mon.reasons["mem_bytes"] is None and first.values["mem_bytes"][0] >= x.nbytes
  assert len(mon.match) == len(jax.local_devices()) and all("PCI bus" in m for m in mon.match), mon.match
  assert mon.reasons["power_W"] is None and all(0 < p < 2000 for p in second.values["power_W"]), mon.reasons
  assert mon.reasons["energy_J"] is None, mon.reasons
  assert all(b >= a for a, b in zip(first.values["energy_J"], second.values["energy_J"]))
  kind = jax.devices()[0].device_kind
  assert flops.peak_flops_per_device(kind)[0], f"add {kind!r} to metrics/flops.py PEAK_FLOPS"


def test_throughput_power_of_the_timed_window(monkeypatch):
  """benchmarks/throughput.py's power columns: the mean sampled board power and the energy counter's rate times
  the step time, for a JAX device and for a torch device found by its PCI bus id (the peer's)."""
  import importlib.util
  import types
  from pathlib import Path
  spec = importlib.util.spec_from_file_location(
      "throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py")
  tp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tp)
  clock = Clock(0.0)
  install_fake_nvml(monkeypatch, clock)
  props = types.SimpleNamespace(name="NVIDIA H200", pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
  torch = types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_properties=lambda i: props))
  for devices in (gpus(clock), [tp._TorchGPU(torch)]):
    mon = DeviceMonitor(devices, interval_s=3600, clock=clock)  # device 0 is "A": 200 + 100 t W, counter 300 W
    for t in (0.0, 1.0):
      clock.t = t
      mon.read()
    clock.t = 2.0  # power_of takes the last sample itself
    got = tp.power_of(mon, 0.0, 2.0, steps=4)
    assert got["power_W"] == pytest.approx(300.0)  # mean of 200, 300, 400
    assert got["energy_J_per_step"] == pytest.approx(300.0 * 2.0 / 4)
    assert got["power_limit_W"] == 700.0
  assert tp.power_of(None, 0.0, 1.0, steps=1) == {}
