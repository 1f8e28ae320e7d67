"""Data-parallel and FSDP scaling on the GPUs of one host: tokens/s per GPU against one GPU of the same machine.

  python benchmarks/scaling.py --sizes=0.5B,1.5B --steps=20 --out=scaling.json

Each run is its own `python -m launch` subprocess. The per-GPU micro-batch stays the seed's (4 / 2 / 1), so the
global batch grows with the GPU count (weak scaling, as data parallelism is used in practice). Prints a table
and writes the summaries' key figures as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from configs import base

_SIZES = flags.DEFINE_list("sizes", ["0.5B", "1.5B"], "Qwen2.5 sizes.")
_STEPS = flags.DEFINE_integer("steps", 20, "Optimizer steps per run.")
_OUT = flags.DEFINE_string("out", "scaling.json", "Where the figures go.")


def _run(size: str, gpus: int, mesh: dict[str, int], steps: int, root: Path) -> dict:
  name = f"{size}_{'x'.join(f'{k}{v}' for k, v in mesh.items())}"
  micro = base.SIZES[size]["micro_batch"] * gpus
  args = [sys.executable, "-m", "launch", f"--config=configs/base.py:{size}", f"--workdir={root / name}",
          f"--config.train.steps={steps}", "--config.train.log_every=5", "--config.train.eval_batches=1",
          f"--config.train.micro_batch={micro}"]
  args += [f"--config.mesh.shape.{k}={v}" for k, v in dict(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh).items()]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
  r = subprocess.run(args, env=env, capture_output=True, text=True)
  if r.returncode:
    return {"name": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
  s = json.loads((root / name / "summary.json").read_text())
  keep = ("tokens_per_s", "tokens_per_s_per_device", "AL_s", "MFU", "peak_memory_GB", "devices", "device_kind")
  return {"name": name, "size": size, "gpus": gpus, "micro_batch": micro, **{k: s.get(k) for k in keep}}


def main(argv):
  del argv
  root = Path(tempfile.mkdtemp(prefix="scaling-"))
  rows = []
  for size in _SIZES.value:
    one = _run(size, 1, {"data": 1}, _STEPS.value, root)
    rows.append(one)
    for mesh in ({"data": 2}, {"fsdp": 2}):
      row = _run(size, 2, mesh, _STEPS.value, root)
      if "error" not in row and "error" not in one:
        row["scaling_efficiency"] = row["tokens_per_s_per_device"] / one["tokens_per_s_per_device"]
      rows.append(row)
  Path(_OUT.value).write_text(json.dumps(rows, indent=2))
  print(f"{'run':<22} {'GPUs':>4} {'tok/s':>10} {'tok/s/GPU':>10} {'AL s':>7} {'MFU':>6} {'peak GB':>8} {'eff':>6}")
  for r in rows:
    if "error" in r:
      print(f"{r['name']:<22} error: {r['error']}")
      continue
    eff = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
    mfu = f"{r['MFU']:.1%}" if r.get("MFU") else "n/a"
    peak = f"{r['peak_memory_GB']:.1f}" if r.get("peak_memory_GB") else "n/a"
    print(f"{r['name']:<22} {r['gpus']:>4} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_device']:>10,.0f} "
          f"{r['AL_s']:>7.3f} {mfu:>6} {peak:>8} {eff:>6}")


if __name__ == "__main__":
  app.run(main)
