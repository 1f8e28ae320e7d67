"""A scripted two-GPU machine for the monitor / efficiency tests: fake JAX devices, a fake NVML, a settable clock.

Traces are linear in time (the trapezoid rule is then exact, whatever the sample times), and the NVML enumeration
order is the reverse of JAX's, so only PCI-bus matching pairs them right:
  JAX device 0 = "A", PCI 0000:3b:00.0, NVML index 1: power 200 + 100 t W, energy counter rising 300 W,
                 util 50 + 5 t %, bytes in use 10e9 + 2e9 t, peak 30e9
  JAX device 1 = "B", PCI 0000:19:00.0, NVML index 0: power 100 W, energy counter rising 150 W,
                 util 100 %, bytes in use 4e9, peak 5e9
"""

from __future__ import annotations

import types

import pynvml


class Clock:
  def __init__(self, t: float = 0.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


TRACES = {
    "A": dict(bus="00000000:3B:00.0", power=lambda t: 200 + 100 * t, energy_rate=300.0, util=lambda t: 50 + 5 * t,
              mem=lambda t: 10e9 + 2e9 * t, peak=30e9),
    "B": dict(bus="00000000:19:00.0", power=lambda t: 100.0, energy_rate=150.0, util=lambda t: 100.0,
              mem=lambda t: 4e9, peak=5e9),
}
NVML_ORDER = ["B", "A"]  # NVML enumerates by bus id: 0x19 before 0x3b


class FakeDevice:
  platform = "gpu"
  device_kind = "NVIDIA H100 80GB HBM3"

  def __init__(self, k: int, name: str, clock: Clock, *, with_bus_id: bool = True):
    self.id = self.local_hardware_id = k
    self.name, self.clock = name, clock
    if with_bus_id:
      self.pci_bus_id = "0000:" + TRACES[name]["bus"].split(":", 1)[1].lower()

  def memory_stats(self):
    tr = TRACES[self.name]
    return {"bytes_in_use": tr["mem"](self.clock()), "peak_bytes_in_use": tr["peak"], "bytes_limit": 80e9}

  def __repr__(self):
    return f"FakeGPU({self.id})"


def install_fake_nvml(monkeypatch, clock: Clock, *, energy_supported: bool = True, init_error: bool = False):
  """Monkeypatches pynvml's functions; returns the list of calls made (for assertions)."""
  calls = []

  def init():
    calls.append("init")
    if init_error:
      raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

  def energy(h):
    if not energy_supported:
      raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return int(round((5e6 + TRACES[h]["energy_rate"] * clock() * 1e3)))  # mJ since "driver load"

  fns = {
      "nvmlInit": init,
      "nvmlShutdown": lambda: calls.append("shutdown"),
      "nvmlDeviceGetCount": lambda: len(NVML_ORDER),
      "nvmlDeviceGetHandleByIndex": lambda i: NVML_ORDER[i],
      "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId=TRACES[h]["bus"].encode()),
      "nvmlDeviceGetPowerUsage": lambda h: int(round(TRACES[h]["power"](clock()) * 1e3)),  # mW
      "nvmlDeviceGetTotalEnergyConsumption": energy,
      "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=TRACES[h]["util"](clock()), memory=0),
      "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
      "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=80e9, used=70e9, free=10e9),
  }
  for name, fn in fns.items():
    monkeypatch.setattr(pynvml, name, fn)
  return calls
