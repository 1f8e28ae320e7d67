"""Plausibility check of a run's summary.json (the metrics issue's GPU acceptance), printing what it checked.

  python -m efficientllm_jax.metrics.check runs/x/summary.json [--energy_tolerance=0.10]

Fails (exit 1) on: a null schema metric (its reason is printed), MFU or PCU outside (0, 1], AMU above the card's
memory or above the peak, a device's AEC at or above its power limit, the energy counter and power x time
disagreeing by more than the tolerance, or the train step compiling more than once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from efficientllm_jax.metrics.efficiency import SUMMARY_KEYS


def problems(s: dict, energy_tolerance: float = 0.10) -> list[str]:
  out = [f"{k} is null: {s.get(f'{k}_null_reason', 'no reason given')}" for k in SUMMARY_KEYS if s.get(k) is None]
  if s.get("MFU") is not None and not 0 < s["MFU"] < 1:
    out.append(f"MFU={s['MFU']:.4f} is outside (0, 1)")
  if s.get("PCU") is not None and not 0 < s["PCU"] <= 1:
    out.append(f"PCU={s['PCU']:.4f} is outside (0, 1]")
  caps = [c for c in s.get("memory_total_GB_per_device") or [] if c]
  if s.get("AMU_GB") is not None and caps and s["AMU_GB"] > min(caps):
    out.append(f"AMU_GB={s['AMU_GB']:.2f} exceeds the device memory {min(caps):.2f} GB")
  if s.get("AMU_GB") is not None and s.get("peak_memory_GB") is not None and s["AMU_GB"] > s["peak_memory_GB"]:
    out.append(f"AMU_GB={s['AMU_GB']:.2f} exceeds peak_memory_GB={s['peak_memory_GB']:.2f}")
  for k, (w, limit) in enumerate(zip(s.get("AEC_W_per_device") or [], s.get("power_limit_W_per_device") or [])):
    if w is not None and limit and w >= limit:
      out.append(f"device {k}: AEC {w:.0f} W is not under its power limit {limit:.0f} W")
  rel = s.get("energy_counter_vs_power_rel_diff")
  if rel is None:
    out.append(f"energy counter vs power x time not compared: "
               f"{s.get('energy_counter_vs_power_rel_diff_null_reason', 'no reason given')}")
  elif abs(rel) > energy_tolerance:
    out.append(f"energy counter and power x time differ by {rel:+.1%} (tolerance {energy_tolerance:.0%})")
  if s.get("train_step_compiles", 1) > 1:
    out.append(f"train_step compiled {s['train_step_compiles']} times (a recompilation slipped into the timings)")
  return out


def report(s: dict) -> str:
  keys = ("device_kind", "devices", "AL_s", "tokens_per_s", "tokens_per_s_per_device", "TT", "ST", "MFU", "PCU",
          "AMU_GB", "peak_memory_GB", "memory_total_GB_per_device", "AEC_W_per_device", "AEC_W_total",
          "AEC_W_total_from_power", "power_limit_W_per_device", "energy_J_total", "energy_J_total_from_power",
          "energy_counter_vs_power_rel_diff", "J_per_token", "PPL", "gpu_hours", "compile_s", "wall_s")
  return "\n".join(f"  {k:34s} {s.get(k)}" for k in keys)


def main(argv: list[str]) -> int:
  args = [a for a in argv[1:] if not a.startswith("--")]
  tol = next((float(a.split("=", 1)[1]) for a in argv[1:] if a.startswith("--energy_tolerance=")), 0.10)
  if len(args) != 1:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  s = json.loads(Path(args[0]).read_text())
  print(report(s))
  bad = problems(s, tol)
  print("\n".join(f"FAIL {p}" for p in bad) if bad else "OK: every metric measured and plausible")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
