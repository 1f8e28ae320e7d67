"""Background sampler of every local device: allocator memory, and through NVML power, utilisation and energy.

Each reading holds, per local JAX device (in `jax.local_devices()` order):
  mem_bytes    allocator bytes in use          device.memory_stats()["bytes_in_use"]
  peak_bytes   allocator peak since start      device.memory_stats()["peak_bytes_in_use"]
  power_W      board power draw                nvmlDeviceGetPowerUsage (mW -> W)
  util         busy-time percentage (0..100)   nvmlDeviceGetUtilizationRates().gpu
  energy_J     total-energy counter            nvmlDeviceGetTotalEnergyConsumption (mJ since driver load -> J)
A field that cannot be read is None in every reading and `reasons[field]` says why (CPU: memory_stats() is None;
no GPU / no NVML library / an older board: the NVML fields). Sampling never raises: the run goes on.

JAX devices are matched to NVML handles by PCI bus id: the device's own `pci_bus_id` attribute where the installed
jaxlib has one, else the CUDA driver's cuDeviceGetPCIBusId for the device's ordinal (`local_hardware_id`, which
honours CUDA_VISIBLE_DEVICES as NVML does not); if neither is available, NVML index = local_hardware_id, with the
reason logged and kept in `match`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

FIELDS = ("mem_bytes", "peak_bytes", "power_W", "util", "energy_J")
NVML_FIELDS = ("power_W", "util", "energy_J")


@dataclasses.dataclass(frozen=True)
class Reading:
  t: float  # the sampler clock (time.perf_counter unless injected)
  values: dict[str, tuple[float | None, ...]]  # field -> one value per local device


def normalize_bus_id(bus_id: Any) -> str | None:
  """'00000000:19:00.0' (NVML) and '0000:19:00.0' (CUDA) -> '0000:19:00.0'; None if unparseable."""
  if isinstance(bus_id, bytes):
    bus_id = bus_id.decode(errors="replace")
  if not isinstance(bus_id, str):
    return None
  try:
    domain, bus, devfn = bus_id.strip().rstrip("\x00").split(":")
    dev, fn = devfn.split(".")
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
  except ValueError:
    return None


def cuda_bus_id(ordinal: int) -> tuple[str | None, str]:
  """PCI bus id of CUDA device `ordinal` from the driver library, or (None, why not)."""
  try:
    lib = ctypes.CDLL("libcuda.so.1")
    dev, buf = ctypes.c_int(), ctypes.create_string_buffer(64)
    for rc, fn in ((lib.cuInit(0), "cuInit"), (lib.cuDeviceGet(ctypes.byref(dev), int(ordinal)), "cuDeviceGet"),
                   (lib.cuDeviceGetPCIBusId(buf, 64, dev), "cuDeviceGetPCIBusId")):
      if rc != 0:
        return None, f"{fn} returned CUDA error {rc}"
    return normalize_bus_id(buf.value), "cuDeviceGetPCIBusId"
  except (OSError, AttributeError) as e:
    return None, f"libcuda.so.1 unavailable ({e})"


def device_bus_id(device) -> tuple[str | None, str]:
  own = normalize_bus_id(getattr(device, "pci_bus_id", None))
  if own:
    return own, "device.pci_bus_id"
  bus, how = cuda_bus_id(device.local_hardware_id)
  return bus, how if bus else f"jax device has no pci_bus_id and {how}"


class DeviceMonitor:
  """Samples every `interval_s` on a daemon thread after `start()`; `read()` also samples synchronously."""

  def __init__(self, devices=None, *, interval_s: float = 0.5, clock: Callable[[], float] = time.perf_counter,
               nvml: Any = "import"):
    if devices is None:
      import jax
      devices = jax.local_devices()
    self.devices = list(devices)
    self.interval_s = float(interval_s)
    self.clock = clock
    self.reasons: dict[str, str | None] = {f: None for f in FIELDS}
    self.match: list[str] = []  # how each device found its NVML handle
    self.power_limit_W: list[float | None] = [None] * len(self.devices)
    self.memory_total_bytes: list[float | None] = [None] * len(self.devices)  # NVML: the card's memory
    self.allocator_limit_bytes: list[float | None] = [None] * len(self.devices)  # what XLA may allocate
    self._readings: list[Reading] = []
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._nvml, self._handles = None, [None] * len(self.devices)
    self._probe_memory()
    self._setup_nvml(nvml)

  # ---- setup -----------------------------------------------------------------------------------------------
  def _probe_memory(self) -> None:
    why = None
    for k, d in enumerate(self.devices):
      try:
        stats = d.memory_stats()
      except Exception as e:  # some backends raise instead of returning None
        stats, why = None, f"device.memory_stats() raised {type(e).__name__}: {e}"
      if not stats or "bytes_in_use" not in stats:
        kind = f" ({d.device_kind})" if d.device_kind != d.platform else ""
        why = why or f"device.memory_stats() returns {stats!r} on platform {d.platform}{kind}"
        break
      if stats.get("bytes_limit"):
        self.allocator_limit_bytes[k] = float(stats["bytes_limit"])
    self.reasons["mem_bytes"] = why
    self.reasons["peak_bytes"] = why

  def _no_nvml(self, why: str) -> None:
    for f in NVML_FIELDS:
      self.reasons[f] = why

  def _setup_nvml(self, nvml) -> None:
    platforms = sorted({d.platform for d in self.devices})
    if platforms != ["gpu"]:
      return self._no_nvml(f"no NVIDIA GPU: devices are {'/'.join(platforms)} (NVML reads NVIDIA GPUs only)")
    if nvml == "import":
      try:
        import pynvml as nvml
      except ImportError:
        return self._no_nvml("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    if nvml is None:
      return self._no_nvml("NVML disabled")
    try:
      nvml.nvmlInit()
    except Exception as e:
      return self._no_nvml(f"nvmlInit failed: {e}")
    self._nvml = nvml
    try:
      by_bus = {}
      for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        by_bus[normalize_bus_id(nvml.nvmlDeviceGetPciInfo(h).busId)] = h
      for k, d in enumerate(self.devices):
        bus, how = device_bus_id(d)
        if bus in by_bus:
          self._handles[k], note = by_bus[bus], f"{d}: PCI bus {bus} ({how})"
        else:
          self._handles[k] = nvml.nvmlDeviceGetHandleByIndex(d.local_hardware_id)
          note = (f"{d}: NVML index {d.local_hardware_id} = local_hardware_id, PCI bus id unmatched ({how}); "
                  "wrong if CUDA_VISIBLE_DEVICES reorders GPUs")
          logging.warning("monitor: %s", note)
        self.match.append(note)
    except Exception as e:
      self._nvml = None
      return self._no_nvml(f"NVML handle lookup failed: {e}")
    self._probe_nvml_fields()

  def _probe_nvml_fields(self) -> None:
    for field in NVML_FIELDS:
      try:
        for h in self._handles:
          self._read_nvml(field, h)
      except Exception as e:
        self.reasons[field] = f"{_NVML_CALL[field]} failed: {e}"
    for k, h in enumerate(self._handles):
      try:
        self.power_limit_W[k] = self._nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3
      except Exception:  # information only
        pass
      try:
        self.memory_total_bytes[k] = float(self._nvml.nvmlDeviceGetMemoryInfo(h).total)
      except Exception:
        pass

  def _read_nvml(self, field: str, h) -> float:
    n = self._nvml
    if field == "power_W":
      return n.nvmlDeviceGetPowerUsage(h) / 1e3
    if field == "util":
      return float(n.nvmlDeviceGetUtilizationRates(h).gpu)
    return n.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3

  # ---- sampling --------------------------------------------------------------------------------------------
  def _memory(self) -> tuple[list, list]:
    if self.reasons["mem_bytes"]:
      return [None] * len(self.devices), [None] * len(self.devices)
    cur, peak = [], []
    for d in self.devices:
      try:
        s = d.memory_stats() or {}
      except Exception:
        s = {}
      cur.append(_float(s.get("bytes_in_use")))
      peak.append(_float(s.get("peak_bytes_in_use")))
    return cur, peak

  def _nvml_values(self, field: str) -> list:
    if self.reasons[field] or self._nvml is None:
      return [None] * len(self.devices)
    out = []
    for h in self._handles:
      try:
        out.append(self._read_nvml(field, h))
      except Exception:  # a transient NVML hiccup loses one sample, not the run
        out.append(None)
    return out

  def read(self) -> Reading:
    """One synchronous sample of every field, stored with the background ones and returned."""
    cur, peak = self._memory()
    values = {"mem_bytes": tuple(cur), "peak_bytes": tuple(peak)}
    values.update({f: tuple(self._nvml_values(f)) for f in NVML_FIELDS})
    r = Reading(self.clock(), values)
    with self._lock:
      self._readings.append(r)
    return r

  def readings(self, t0: float = float("-inf"), t1: float = float("inf")) -> list[Reading]:
    with self._lock:
      return [r for r in self._readings if t0 <= r.t <= t1]

  def _run(self) -> None:
    while not self._stop.wait(self.interval_s):
      try:
        self.read()
      except Exception as e:  # never kill the run from the sampler
        logging.warning("monitor: sample failed: %s", e)

  def start(self) -> DeviceMonitor:
    if self._thread is None:
      self.read()
      self._thread = threading.Thread(target=self._run, name="device-monitor", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self._nvml is not None:
      try:
        self._nvml.nvmlShutdown()
      except Exception:
        pass
      self._nvml = None


_NVML_CALL = {"power_W": "nvmlDeviceGetPowerUsage", "util": "nvmlDeviceGetUtilizationRates",
              "energy_J": "nvmlDeviceGetTotalEnergyConsumption"}


def _float(v) -> float | None:
  return None if v is None else float(v)
