"""The EfficientLLM metrics, defined once, measured over the run's measured window.

Measured window: every optimizer step after the first max(1, metrics.warmup_steps) steps this process ran (the
first always carries compilation), eval time cut out. A step lasts from the moment the previous step's scalars
arrived (the loop keeps the device one step ahead, so this is device time plus whatever the host adds) to the
moment its own arrive. Samples (monitor.py) inside the window are time-averaged by the trapezoid rule; energy
comes from the NVML counter read at the window's edges. Whole-run averages, never rolling ones.

  AL_s          mean wall seconds per optimizer step over the measured steps
  tokens_per_s  tokens_per_step / AL_s (the global batch); tokens_per_s_per_device = that / devices
  TT, ST        tokens (samples) / total parameters / second, EfficientLLM's normalisation; for MoE also
                TT_active / ST_active over the parameters one token passes through (params.active)
  MFU           analytic model FLOPs per step (flops.py: 3 x forward, remat not counted) /
                (AL_s x peak FLOP/s of the device kind x devices)
  PCU           NVML busy-time fraction (0..1), time-averaged per device, then the mean over devices
  AMU_GB        allocator bytes in use, time-averaged per device, then the mean over devices (GB = 1e9 bytes)
  peak_memory_GB  the largest allocator peak (peak_bytes_in_use, whole process) of any device
  AEC_W_per_device  mean power per device = energy-counter delta / window seconds; AEC_W_total = their sum over
                every device of the run (not an average); *_from_power = the same from sampled power x time, the
                cross-check; energy_counter_vs_power_rel_diff = (counter - power) / power, total energy
  J_per_token   energy of all devices over the window / tokens trained in it
  PPL           exp(eval_loss), eval_loss = token-mean loss of the final evaluation on held-out data
  gpu_hours     wall_s / 3600 x devices (accelerators only; device_hours always)
  compile_s     time jax spent tracing, lowering and compiling the train step (jax.monitoring duration events);
                compile_total_s adds every other jit of the run; neither is part of AL_s

summary.json schema (SUMMARY_KEYS; a metric that could not be measured is null and "<key>_null_reason" says why):
  size, attention, position, ffn, steps, params{total, embedding, non_embedding[, active]}, micro_batch,
  grad_accum, seq_len, tokens_per_step, devices, device_kind, compile_s, AL_s, tokens_per_s,
  tokens_per_s_per_device, TT, ST, AMU_GB, peak_memory_GB, PCU, MFU, AEC_W_per_device (list), AEC_W_total,
  J_per_token, PPL, eval_loss, final_loss, gpu_hours, wall_s
plus: status ("ok" or "failed: <error>"), first_loss, train_step_compiles (1 unless something recompiled it), TT_params ("total"), TT_active/ST_active (MoE), AL_s_std, measured_steps, measured_window_s,
  warmup_steps_excluded, flops_per_step, peak_flops_per_device, peak_flops_source, compile_total_s,
  AMU_GB_per_device, peak_memory_GB_per_device, PCU_per_device, energy_J_total, AEC_W_per_device_from_power,
  AEC_W_total_from_power, energy_J_total_from_power, energy_counter_vs_power_rel_diff, power_limit_W_per_device,
  memory_total_GB_per_device, nvml_match, compiled_memory_GB, device_hours, platform.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
from efficientllm_jax.metrics import flops as flops_lib
from efficientllm_jax.metrics.monitor import DeviceMonitor, Reading

GB = 1e9
SUMMARY_KEYS = (
    "size", "attention", "position", "ffn", "steps", "params", "micro_batch", "grad_accum", "seq_len",
    "tokens_per_step", "devices", "device_kind", "compile_s", "AL_s", "tokens_per_s", "tokens_per_s_per_device",
    "TT", "ST", "AMU_GB", "peak_memory_GB", "PCU", "MFU", "AEC_W_per_device", "AEC_W_total", "J_per_token", "PPL",
    "eval_loss", "final_loss", "gpu_hours", "wall_s")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


# ---- integrals over samples --------------------------------------------------------------------------------------

def integrate(readings: list[Reading], field: str, ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Per device (trapezoid integral of `field` dt, seconds covered) over the samples inside `ranges`."""
  n = len(readings[0].values[field]) if readings else 0
  out = []
  for k in range(n):
    area = span = 0.0
    for a, b in ranges:
      pts = sorted((r.t, r.values[field][k]) for r in readings if a <= r.t <= b and r.values[field][k] is not None)
      for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        area += 0.5 * (v0 + v1) * (t1 - t0)
        span += t1 - t0
    out.append((area, span))
  return out


def time_average(readings, field, ranges) -> list[float | None]:
  return [area / span if span > 0 else None for area, span in integrate(readings, field, ranges)]


def counter_delta(segments: list[tuple[Reading, Reading]], field: str) -> list[float | None]:
  """Per device: sum over segments of (end - start) of a cumulative counter; None if any edge is missing."""
  if not segments:
    return []
  out = []
  for k in range(len(segments[0][0].values[field])):
    edges = [(a.values[field][k], b.values[field][k]) for a, b in segments]
    out.append(None if any(x is None or y is None for x, y in edges) else sum(y - x for x, y in edges))
  return out


def _gather(values: list[float | None]) -> list[float | None]:
  """Per-device values of every process (process order, local device order); single process: unchanged."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils
  arr = np.array([np.nan if v is None else v for v in values], np.float64)
  every = np.asarray(multihost_utils.process_allgather(arr)).reshape(-1)
  return [None if np.isnan(v) else float(v) for v in every]


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def _scaled(xs, s):
  return [None if x is None else x / s for x in xs]


# ---- compile time and profiler -------------------------------------------------------------------------------

class CompileTimer:
  """Sums jax.monitoring compile-duration events by function name while registered."""

  def __init__(self):
    self.seconds: dict[str, float] = defaultdict(float)
    self.backend_compiles: dict[str, int] = defaultdict(int)  # > 1 for train_step means it recompiled
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      name = str(kwargs.get("fun_name", "?"))
      if name.startswith("jit(") and name.endswith(")"):
        name = name[4:-1]
      self.seconds[name] += float(duration_secs)
      if event == COMPILE_EVENTS[-1]:
        self.backend_compiles[name] += 1

  def close(self) -> None:
    try:
      jax.monitoring.unregister_event_duration_listener(self._listen)
    except (AssertionError, ValueError):
      pass


class Profiler:
  """jax.profiler trace of steps [profile.start_step, start_step + num_steps) into `logdir` (TensorBoard's profile
  tab); off when profile.num_steps == 0. Every step runs under a StepTraceAnnotation."""

  def __init__(self, cfg, logdir: Path | None, say=print):
    self.start, self.num = int(cfg.profile.start_step), int(cfg.profile.num_steps)
    self.logdir, self.say, self.active = logdir, say, False

  @contextlib.contextmanager
  def annotate(self, step: int):
    if self.num and step == self.start and self.logdir is not None and not self.active:
      jax.profiler.start_trace(str(self.logdir))
      self.active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def ends_at(self, step: int) -> bool:
    return self.active and step >= self.start + self.num - 1

  def step_done(self, step: int) -> None:
    """Called once `step`'s results have arrived, so the trace holds its device work."""
    if self.ends_at(step):
      self.stop()
      self.say(f"profile: steps {self.start}..{step} traced into {self.logdir} (TensorBoard > Profile)")

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


# ---- the aggregator ------------------------------------------------------------------------------------------

class Efficiency:
  """Created before the loop; the loop calls annotate / step_done / pause / resume / interval_scalars / finish.

  As a context manager it always stops the sampler, the trace and the compile listener; a run that raises
  still writes summary.json (status "failed: ...") with what was measured.
  """

  def __init__(self, cfg, counts: dict, *, workdir=None, writer=None, monitor: DeviceMonitor | None = None,
               clock=time.perf_counter, devices=None):
    """`devices`: every device of the run (default jax.devices()); `monitor` samples this process' local ones."""
    self.cfg, self.clock, self.writer = cfg, clock, writer
    self.workdir = Path(workdir) if workdir is not None else None
    self.t0 = clock()
    self.counts = dict(counts)  # models.transformer.param_counts: total, embedding, non_embedding, active
    t = cfg.train
    self.samples_per_step = t.micro_batch * t.grad_accum
    self.tokens_per_step = self.samples_per_step * cfg.data.seq_len
    self.flops_per_step = flops_lib.training_flops_per_step(cfg)
    devices = list(devices) if devices is not None else jax.devices()
    self.devices, self.device_kind, self.platform = len(devices), devices[0].device_kind, devices[0].platform
    self.peak, self.peak_source = flops_lib.peak_flops_per_device(self.device_kind, cfg.metrics.peak_flops)
    self.warmup = max(1, int(cfg.metrics.warmup_steps))
    self.monitor = monitor or DeviceMonitor(interval_s=cfg.metrics.sample_interval_s, clock=clock)
    self.compile = CompileTimer()
    self.profiler = Profiler(cfg, self.workdir / "tb" if self.workdir else None, say=self._say)
    self.compiled_memory, self.compiled_memory_reason = None, "inspect_compiled() was not called"
    self.step_times: list[float] = []
    self._k = 0  # steps completed in this process
    self._last_done: float | None = None
    self._open: Reading | None = None
    self._open_steps = 0
    self.segments: list[tuple[Reading, Reading]] = []
    self._interval: list[float] = []
    self._interval_t0 = self.t0
    self.summary: dict | None = None
    self.monitor.start()

  def _say(self, line: str) -> None:
    (self.writer.print if self.writer else print)(line)

  def __enter__(self) -> Efficiency:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is not None and self.summary is None:
      try:
        self.finish(eval_loss=None, final_loss=None, status=f"failed: {type(exc).__name__}: {exc}")
      except Exception as e:  # never mask the run's own error
        logging.warning("efficiency: could not write the failed run's summary: %s", e)
    self.close()

  def close(self) -> None:
    self.profiler.stop()
    self.monitor.stop()
    self.compile.close()

  # ---- loop hooks --------------------------------------------------------------------------------------------
  def inspect_compiled(self, jitted, *args) -> None:
    """Compiles `jitted` for `args` ahead of its first call (the call then reuses the executable) and logs XLA's
    memory_analysis() of it once."""
    try:
      ma = jitted.lower(*args).compile().memory_analysis()
      if ma is None:
        raise ValueError("memory_analysis() returned None on this backend")
      parts = {k: getattr(ma, f"{k}_size_in_bytes") / GB for k in ("argument", "output", "alias", "temp")}
      parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
      self.compiled_memory = {f"{k}_GB": round(v, 4) for k, v in parts.items()}
      self._say("compiled train step (XLA memory_analysis): " +
                ", ".join(f"{k} {v:.3f} GB" for k, v in parts.items()))
    except Exception as e:
      self.compiled_memory_reason = f"memory_analysis unavailable: {type(e).__name__}: {e}"
      self._say(f"compiled train step: {self.compiled_memory_reason}")

  def annotate(self, step: int):
    """Context around dispatching `step`: step annotation, profiler window."""
    return self.profiler.annotate(step)

  def step_done(self, step: int, now: float | None = None) -> None:
    """`step`'s results have arrived (the caller blocked on them) at `now`."""
    now = self.clock() if now is None else now
    k, self._k = self._k, self._k + 1
    if self._last_done is not None:
      self._interval.append(now - self._last_done)
      if k >= self.warmup:
        self.step_times.append(now - self._last_done)
        self._open_steps += 1
    self._last_done = now
    if self.profiler.ends_at(step):  # writing the trace out is neither step time nor inside the window
      self.pause()
      self.profiler.step_done(step)
      self.resume()
    if k + 1 == self.warmup and self._open is None:  # the window opens as the first measured step runs
      self._open, self._open_steps = self.monitor.read(), 0

  def pause(self) -> None:
    """Before work that is not a training step (eval): closes the window's current segment."""
    if self._open is not None and self._open_steps:
      self.segments.append((self._open, self.monitor.read()))
    self._open = None

  def resume(self, now: float | None = None) -> None:
    """After the non-step work: the next step's time starts here."""
    self._last_done = self.clock() if now is None else now
    if self._k >= self.warmup:
      self._open, self._open_steps = self.monitor.read(), 0

  def interval_scalars(self, now: float | None = None) -> dict[str, float]:
    """Scalars since the previous call (TensorBoard / progress line): step time (the compile step excluded),
    tokens/s, MFU, and time-averaged memory (GB per device), utilisation (%) and total power (W)."""
    now = self.clock() if now is None else now
    out = {}
    if self._interval:
      st = float(np.mean(self._interval))
      out.update(step_time=st, tokens_per_s=self.tokens_per_step / st)
      if self.peak:
        out["MFU"] = self.flops_per_step / (st * self.peak * self.devices)
    rs = self.monitor.readings(self._interval_t0, now)
    for field, name, reduce, scale in (("mem_bytes", "memory_GB", _mean, GB), ("util", "util_pct", _mean, 1.0),
                                       ("power_W", "power_W_total", _sum_all, 1.0)):
      per_dev = time_average(rs, field, [(self._interval_t0, now)])
      if rs and all(v is None for v in per_dev):  # a single sample in the interval: take it as it is
        per_dev = list(rs[-1].values[field])
      agg = reduce(per_dev) if per_dev else None
      if agg is not None:
        out[name] = agg / scale
    self._interval, self._interval_t0 = [], now
    return out

  # ---- the summary -------------------------------------------------------------------------------------------
  def finish(self, *, eval_loss: float | None, final_loss: float | None, first_loss: float | None = None,
             status: str = "ok") -> dict:
    """Closes the window, computes every metric, writes summary.json / TensorBoard / the console line.
    Every process calls it (multi-host per-device lists are gathered), except on the failure path."""
    self.pause()
    end = self.monitor.read()
    s = self._compute(end, eval_loss, final_loss, collective=status == "ok")
    s["first_loss"] = first_loss
    s["status"] = status
    self.summary = s
    if self.workdir is not None and jax.process_index() == 0:
      (self.workdir / "summary.json").write_text(json.dumps(s, indent=2))
    if self.writer is not None:
      flat = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
      self.writer.write(int(self.cfg.train.steps), flat, prefix="summary")
    for line in console_lines(s):
      self._say(line)
    return s

  def _compute(self, end: Reading, eval_loss, final_loss, collective: bool) -> dict:
    cfg, mon = self.cfg, self.monitor
    gather = _gather if collective else list
    s: dict = {}
    put = _putter(s)
    wall_s = self.clock() - self.t0
    s.update(size=cfg.size, attention=cfg.attention.kind, position=cfg.position.kind, ffn=cfg.ffn.kind,
             steps=int(cfg.train.steps), params=self.counts, micro_batch=int(cfg.train.micro_batch),
             grad_accum=int(cfg.train.grad_accum), seq_len=int(cfg.data.seq_len),
             tokens_per_step=self.tokens_per_step, devices=self.devices, device_kind=self.device_kind,
             platform=self.platform)
    ct = self.compile.seconds
    put("compile_s", ct.get("train_step"), "no jax.monitoring compile event for train_step (compiled before the "
        "listener was registered?)")
    put("compile_total_s", sum(ct.values()) if ct else None, "no jax.monitoring compile events")
    s["train_step_compiles"] = self.compile.backend_compiles.get("train_step", 0)

    n = len(self.step_times)
    no_steps = (f"no measured steps: the run's first {self.warmup} step(s) are compile/warm-up "
                f"(metrics.warmup_steps={cfg.metrics.warmup_steps}) and it completed {self._k}; run more steps")
    al = float(np.mean(self.step_times)) if n else None
    s.update(measured_steps=n, warmup_steps_excluded=self.warmup,
             measured_window_s=float(np.sum(self.step_times)) if n else 0.0)
    put("AL_s", al, no_steps)
    put("AL_s_std", float(np.std(self.step_times)) if n else None, no_steps)
    tps = self.tokens_per_step / al if al else None
    sps = self.samples_per_step / al if al else None
    put("tokens_per_s", tps, no_steps)
    put("tokens_per_s_per_device", tps / self.devices if tps else None, no_steps)
    s["TT_params"] = "total"
    put("TT", tps / self.counts["total"] if tps else None, no_steps)
    put("ST", sps / self.counts["total"] if sps else None, no_steps)
    if "active" in self.counts:
      put("TT_active", tps / self.counts["active"] if tps else None, no_steps)
      put("ST_active", sps / self.counts["active"] if sps else None, no_steps)
    s["flops_per_step"] = self.flops_per_step
    put("peak_flops_per_device", self.peak, self.peak_source)
    s["peak_flops_source"] = self.peak_source if self.peak else None
    mfu = self.flops_per_step / (al * self.peak * self.devices) if (al and self.peak) else None
    put("MFU", mfu, no_steps if not al else self.peak_source)

    readings = mon.readings()
    ranges = [(a.t, b.t) for a, b in self.segments]
    no_window = no_steps if not n else "no samples inside the measured window"
    amu = gather(_scaled(time_average(readings, "mem_bytes", ranges), GB))
    put("AMU_GB", _mean(amu), mon.reasons["mem_bytes"] or no_window)
    put("AMU_GB_per_device", amu if _mean(amu) is not None else None, mon.reasons["mem_bytes"] or no_window)
    peak = gather(_scaled(list(end.values["peak_bytes"]), GB))
    put("peak_memory_GB", max((p for p in peak if p is not None), default=None), mon.reasons["peak_bytes"]
        or "device.memory_stats() has no peak_bytes_in_use")
    put("peak_memory_GB_per_device", peak if any(p is not None for p in peak) else None,
        mon.reasons["peak_bytes"] or "device.memory_stats() has no peak_bytes_in_use")
    pcu = gather(_scaled(time_average(readings, "util", ranges), 100.0))
    put("PCU", _mean(pcu), mon.reasons["util"] or no_window)
    put("PCU_per_device", pcu if _mean(pcu) is not None else None, mon.reasons["util"] or no_window)

    self._energy(put, readings, ranges, n, no_window, gather)
    put("eval_loss", eval_loss, "no evaluation ran")
    put("PPL", math.exp(min(eval_loss, 700.0)) if eval_loss is not None else None, "no evaluation ran")
    put("final_loss", final_loss, "no training step completed")
    s["wall_s"] = wall_s
    s["device_hours"] = wall_s / 3600 * self.devices
    put("gpu_hours", s["device_hours"] if self.platform != "cpu" else None,
        f"devices are cpu, not accelerators (device_hours = {s['device_hours']:.3g})")
    s["power_limit_W_per_device"] = gather(mon.power_limit_W)
    s["memory_total_GB_per_device"] = gather(_scaled(mon.memory_total_bytes, GB))
    s["nvml_match"] = mon.match
    put("compiled_memory_GB", self.compiled_memory, self.compiled_memory_reason)
    return s

  def _energy(self, put, readings, ranges, n, no_window, gather) -> None:
    mon = self.monitor
    window = sum(b - a for a, b in ranges)
    energy = gather(counter_delta(self.segments, "energy_J"))
    power_int = gather([area if span > 0 else None for area, span in integrate(readings, "power_W", ranges)])
    power_avg = gather(time_average(readings, "power_W", ranges))
    counter_ok = bool(energy) and all(e is not None for e in energy) and window > 0
    power_ok = bool(power_avg) and all(p is not None for p in power_avg)
    why_counter = mon.reasons["energy_J"] or no_window
    why_power = mon.reasons["power_W"] or no_window
    aec = [e / window for e in energy] if counter_ok else None
    put("AEC_W_per_device", aec, why_counter)
    put("AEC_W_total", sum(aec) if aec else None, why_counter)
    put("energy_J_total", sum(energy) if counter_ok else None, why_counter)
    put("AEC_W_per_device_from_power", power_avg if power_ok else None, why_power)
    put("AEC_W_total_from_power", sum(power_avg) if power_ok else None, why_power)
    put("energy_J_total_from_power", sum(power_int) if power_ok else None, why_power)
    rel = None
    if counter_ok and power_ok and sum(power_int) > 0:
      rel = (sum(energy) - sum(power_int)) / sum(power_int)
    put("energy_counter_vs_power_rel_diff", rel, why_counter if not counter_ok else why_power)
    tokens = n * self.tokens_per_step
    put("J_per_token", sum(energy) / tokens if counter_ok and tokens else None, why_counter)


def _sum_all(xs):
  return None if not xs or any(x is None for x in xs) else float(sum(xs))


def _putter(s: dict):
  def put(key, value, reason):
    s[key] = value
    if value is None:
      s[f"{key}_null_reason"] = reason
  return put


# ---- console -----------------------------------------------------------------------------------------------

def _fmt(v, spec, unit=""):
  return "null" if v is None else f"{v:{spec}}{unit}"


def console_lines(s: dict) -> list[str]:
  """One line of figures, then one line per distinct reason for the nulls among them."""
  aec = s.get("AEC_W_per_device")
  line = " | ".join([
      f"done: loss {_fmt(s.get('final_loss'), '.4f')}",
      f"AL {_fmt(s.get('AL_s'), '.4f', ' s')}",
      f"tok/s {_fmt(s.get('tokens_per_s'), ',.0f')} ({_fmt(s.get('tokens_per_s_per_device'), ',.0f')}/device)",
      f"TT {_fmt(s.get('TT'), '.3e')}", f"ST {_fmt(s.get('ST'), '.3e')}",
      f"MFU {_fmt(s.get('MFU'), '.1%')}", f"PCU {_fmt(s.get('PCU'), '.1%')}",
      f"AMU {_fmt(s.get('AMU_GB'), '.2f', ' GB')} (peak {_fmt(s.get('peak_memory_GB'), '.2f', ' GB')})",
      f"AEC {_fmt(_mean(aec) if aec else None, '.0f', ' W')}/device, {_fmt(s.get('AEC_W_total'), '.0f', ' W')} total",
      f"J/token {_fmt(s.get('J_per_token'), '.4g')}", f"PPL {_fmt(s.get('PPL'), '.3f')}",
      f"GPU-h {_fmt(s.get('gpu_hours'), '.4f')}", f"compile {_fmt(s.get('compile_s'), '.1f', ' s')}"])
  if s.get("energy_counter_vs_power_rel_diff") is not None:
    line += f" | energy counter vs power x time {s['energy_counter_vs_power_rel_diff']:+.1%}"
  by_reason: dict[str, list[str]] = defaultdict(list)
  for k in SUMMARY_KEYS + ("AEC_W_total_from_power",):
    if s.get(k) is None and f"{k}_null_reason" in s:
      by_reason[s[f"{k}_null_reason"]].append(k)
  return [line] + [f"  null {', '.join(keys)}: {why}" for why, keys in by_reason.items()]
