"""Where scalars go: tensorboardX (workdir/tb), metrics.jsonl, and one console line per log interval."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles


def _num(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


class MetricWriter:
  """Writes from the leader process only (process 0 of a multi-host run); the others' writers do nothing, so a
  workdir on a shared filesystem gets one tb/ stream, one metrics.jsonl and one console."""

  def __init__(self, workdir: Path, *, console=None, leader: bool | None = None):
    self.workdir = Path(workdir)
    self.leader = jax.process_index() == 0 if leader is None else leader
    self.tb = SummaryWriter(str(self.workdir / "tb")) if self.leader else None
    self.jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1) if self.leader else None
    self.console = console  # None: whatever sys.stdout is when printing (not when this module was imported)

  def write(self, step: int, scalars: dict, *, prefix: str = "train") -> None:
    if not self.leader:
      return
    clean = {k: _num(v) for k, v in scalars.items()}
    for k, v in clean.items():
      if v is not None and math.isfinite(v):
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")

  def print(self, line: str) -> None:
    if self.leader:
      print(line, file=self.console or sys.stdout, flush=True)

  def close(self) -> None:
    if self.leader:
      self.tb.close()
      self.jsonl.close()


def progress_line(step: int, total: int, s: dict) -> str:
  parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {s['loss']:.4f}"]
  if "step_time" in s:
    parts += [f"{s['step_time'] * 1e3:.1f} ms/step", f"{s['tokens_per_s']:,.0f} tok/s"]
  if "lr" in s:
    parts.append(f"lr {s['lr']:.2e}")
  if "grad_norm" in s:
    parts.append(f"gnorm {s['grad_norm']:.3f}")
  return " | ".join(parts)
