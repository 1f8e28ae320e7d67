"""Where a step's device time goes: kernel time from a jax.profiler trace, summed by category.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes `perfetto_trace.json.gz` (Chrome trace format). Its
device processes (`/device:GPU:N`) hold one complete event (`ph == "X"`) per kernel, named by the kernel (cuBLAS /
CUTLASS GEMMs, cuDNN attention, XLA fusions, Triton kernels, NCCL collectives) with the HLO op in `args`. Summing
their durations per category says what the step spends its time on; the part of the traced span where no kernel
runs is the idle time (launch gaps, host work, waits on the input). On CPU there are no device processes; the XLA
thunks (events carrying an `hlo_op`) of each host process stand in for kernels.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# First match wins: collectives before attention before matmuls; the rest is XLA's own fused elementwise /
# reduction kernels ("other" when nothing matches).
CATEGORIES = (
    ("collective", ("nccl", "all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter",
                    "reduce_scatter", "all-to-all", "all_to_all", "collective-permute")),
    ("attention", ("cudnn", "fmha", "flash", "attention", "_mha", "nsa_")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "ragged", "gmm", "__dot", "dot_")),
    ("memcpy", ("memcpy", "memset")),
    ("fusion", ("fusion", "reduce", "convert", "transpose", "scatter", "gather", "sort", "triton", "copy")),
)


def category(name: str, hlo_op: str = "") -> str:
  text = f"{name} {hlo_op}".lower()
  for cat, keys in CATEGORIES:
    if any(k in text for k in keys):
      return cat
  return "other"


def find_trace(log_dir: str | Path) -> Path:
  found = sorted(Path(log_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}/plugins/profile (was the trace written?)")
  return found[-1]


def summarize(trace: str | Path | dict, steps: int, top: int = 12) -> dict:
  """Per-step milliseconds by category over the device processes of a Chrome/perfetto trace.

  Returns {"device_ms_per_step": {category: ms}, "busy_ms_per_step", "span_ms_per_step", "idle_fraction",
  "top_kernels": [(name, category, ms per step)], "devices"}. Figures are means over the devices traced.
  """
  if not isinstance(trace, dict):
    path = Path(trace)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and str(e.get("args", {}).get("name", "")).startswith("/device:")}
  complete = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
  if devices:
    kernels = [e for e in complete if e.get("pid") in devices]
  else:  # CPU: XLA's thunks, less the control-flow ones that contain others (a while loop holds its body)
    kernels = [e for e in complete if "hlo_op" in (e.get("args") or {})
               and not e["name"].startswith(("end:", "while", "call", "conditional"))]
    devices = {e["pid"] for e in kernels}
  if not kernels:
    raise ValueError("the trace has no kernel events (no /device: process and no XLA thunk with an hlo_op)")
  n = max(len(devices), 1) * steps
  by_cat: dict[str, float] = {}
  by_name: dict[str, list] = {}
  for e in kernels:
    cat = category(e["name"], str(e.get("args", {}).get("hlo_op", "")))
    by_cat[cat] = by_cat.get(cat, 0.0) + e["dur"]
    by_name.setdefault(e["name"], [cat, 0.0])[1] += e["dur"]
  busy = span = 0.0
  for pid in devices:  # union of kernel intervals per device (streams overlap), and the traced span
    ivs = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if e["pid"] == pid)
    if not ivs:
      continue
    span += ivs[-1][1] - ivs[0][0]
    cur_s, cur_e = ivs[0]
    for s, t in ivs[1:]:
      if s > cur_e:
        busy += cur_e - cur_s
        cur_s, cur_e = s, t
      else:
        cur_e = max(cur_e, t)
    busy += cur_e - cur_s
  ms = lambda us: us / 1e3 / n  # noqa: E731 - trace times are microseconds
  names = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return {"device_ms_per_step": {c: round(ms(v), 3) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
          "busy_ms_per_step": round(ms(busy), 3), "span_ms_per_step": round(ms(span), 3),
          "idle_fraction": round(1 - busy / span, 4) if span else None,
          "top_kernels": [(name[:90], cat, round(ms(us), 3)) for name, (cat, us) in names],
          "devices": len(devices)}


def format_summary(s: dict) -> str:
  """A few lines for a terminal: category split, busy vs span, the heaviest kernels."""
  busy = s["busy_ms_per_step"]
  lines = [f"device time per step: busy {busy:.1f} ms of a {s['span_ms_per_step']:.1f} ms span "
           f"(idle {100 * (s['idle_fraction'] or 0):.1f} %)"]
  lines += [f"  {c:<11}{v:>9.1f} ms {100 * v / busy if busy else 0:>6.1f} %" for c, v in s["device_ms_per_step"].items()]
  lines.append("  heaviest kernels (ms/step):")
  lines += [f"    {v:>8.2f}  {c:<10} {name}" for name, c, v in s["top_kernels"]]
  return "\n".join(lines)
