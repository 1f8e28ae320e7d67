"""Scaling on the GPUs of one host: tokens/s per GPU against one GPU of the same machine.

  python benchmarks/scaling.py --sizes=0.5B,1.5B --meshes=data2,fsdp2,data2xfsdp2 --steps=20 --out=scaling.json

Each run is its own `python -m launch` subprocess on its own GPUs (CUDA_VISIBLE_DEVICES). The per-GPU micro-batch
stays the seed's (4 / 2 / 1), so the global batch grows with the GPU count (weak scaling, as data parallelism is
used in practice). Every size also runs on one GPU, the baseline: scaling efficiency = tokens/s/GPU of the mesh
over tokens/s of one GPU. With --concurrent, runs of the same GPU count and nothing else share the machine at a
time on disjoint GPUs (e.g. two 2-GPU runs on a 4-GPU host), so contention, if any, is the same for the runs
being compared; 4-GPU runs on a 4-GPU host are always alone. Prints a table and writes the key figures as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import base  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["0.5B", "1.5B"], "Qwen2.5 sizes.")
_MESHES = flags.DEFINE_list("meshes", ["data2", "fsdp2"], "Meshes as axis sizes joined by x, e.g. data2xfsdp2.")
_STEPS = flags.DEFINE_integer("steps", 20, "Optimizer steps per run.")
_CONCURRENT = flags.DEFINE_bool("concurrent", False, "Run same-GPU-count runs side by side on disjoint GPUs.")
_OUT = flags.DEFINE_string("out", "scaling.json", "Where the figures go.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.key=value for every run (repeatable).")


def parse_mesh(text: str) -> dict[str, int]:
  """'data2xfsdp2' -> {'data': 2, 'fsdp': 2}."""
  mesh = {}
  for part in text.split("x"):
    m = re.fullmatch(r"(data|fsdp|tensor|expert)(\d+)", part)
    if not m:
      raise app.UsageError(f"--meshes: {part!r} is not <data|fsdp|tensor|expert><size> (e.g. data2xfsdp2)")
    mesh[m[1]] = int(m[2])
  return mesh


def _args(size: str, mesh: dict[str, int], steps: int, workdir: Path) -> list[str]:
  gpus = _gpus(mesh)
  args = [sys.executable, "-m", "launch", f"--config=configs/base.py:{size}", f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.log_every=5", "--config.train.eval_batches=1",
          f"--config.train.micro_batch={base.SIZES[size]['micro_batch'] * gpus}", "--config.checkpoint.every=0",
          "--config.data.eval_fraction=0.06"]  # 4 GPUs x micro-batch 4 needs 16 held-out sequences of 8K
  args += [f"--config.mesh.shape.{k}={v}" for k, v in dict(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh).items()]
  return args + [a if a.startswith("--config.") else f"--config.{a}" for a in _EXTRA.value]


def _row(name: str, size: str, gpus: int, r: subprocess.CompletedProcess, workdir: Path) -> dict:
  if r.returncode:
    return {"name": name, "size": size, "gpus": gpus, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
  s = json.loads((workdir / "summary.json").read_text())
  keep = ("tokens_per_s", "tokens_per_s_per_device", "AL_s", "MFU", "peak_memory_GB", "AEC_W_total", "devices",
          "device_kind", "micro_batch")
  return {"name": name, "size": size, "gpus": gpus, **{k: s.get(k) for k in keep}}


def _run_group(jobs: list[tuple[str, str, dict]], steps: int, root: Path, total_gpus: int, concurrent: bool):
  """Runs jobs (name, size, mesh) of one GPU count, side by side on disjoint GPUs when `concurrent`."""
  rows, pending = [], list(jobs)
  while pending:
    gpus = max(1, _gpus(pending[0][2]))
    width = max(1, total_gpus // gpus) if concurrent else 1
    batch, pending = pending[:width], pending[width:]
    procs = []
    for slot, (name, size, mesh) in enumerate(batch):
      env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(slot * gpus + i) for i in range(gpus)))
      procs.append((name, size, gpus, subprocess.Popen(_args(size, mesh, steps, root / name), env=env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for name, size, gpus_, p in procs:
      out, err = p.communicate()
      rows.append(_row(name, size, gpus_, subprocess.CompletedProcess(p.args, p.returncode, out, err), root / name))
      print(f"  {name}: {'error' if p.returncode else 'done'}", flush=True)
  return rows


def _gpus(mesh: dict[str, int]) -> int:
  return math.prod(mesh.values())


def main(argv):
  del argv
  root = Path(tempfile.mkdtemp(prefix="scaling-"))
  meshes = {m: parse_mesh(m) for m in _MESHES.value}
  total = len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")) if os.environ.get("CUDA_VISIBLE_DEVICES") \
      else _count_gpus()
  jobs = [(f"{s}_1gpu", s, {"data": 1}) for s in _SIZES.value]
  jobs += [(f"{s}_{m}", s, mesh) for m, mesh in meshes.items() for s in _SIZES.value]
  t0, rows = time.time(), []
  for gpus in sorted({_gpus(j[2]) for j in jobs}):
    if gpus > total:
      rows += [{"name": j[0], "size": j[1], "gpus": gpus, "error": f"needs {gpus} GPUs, {total} visible"}
               for j in jobs if _gpus(j[2]) == gpus]
      continue
    rows += _run_group([j for j in jobs if _gpus(j[2]) == gpus], _STEPS.value, root, total, _CONCURRENT.value)
  one = {r["size"]: r for r in rows if r.get("gpus") == 1 and "error" not in r}
  for r in rows:
    if "error" not in r and r["gpus"] > 1 and r["size"] in one:
      r["scaling_efficiency"] = r["tokens_per_s_per_device"] / one[r["size"]]["tokens_per_s_per_device"]
  Path(_OUT.value).write_text(json.dumps(rows, indent=2))
  print(f"{len(rows)} runs in {time.time() - t0:.0f} s on {total} GPUs ({'concurrent' if _CONCURRENT.value else 'one at a time'})")
  print(f"{'run':<22} {'GPUs':>4} {'micro':>5} {'tok/s':>10} {'tok/s/GPU':>10} {'AL s':>7} {'MFU':>6} {'peak GB':>8} {'eff':>6}")
  for r in rows:
    if "error" in r:
      print(f"{r['name']:<22} error: {r['error']}")
      continue
    eff = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
    mfu = f"{r['MFU']:.1%}" if r.get("MFU") else "n/a"
    peak = f"{r['peak_memory_GB']:.1f}" if r.get("peak_memory_GB") else "n/a"
    print(f"{r['name']:<22} {r['gpus']:>4} {r['micro_batch']:>5} {r['tokens_per_s']:>10,.0f} "
          f"{r['tokens_per_s_per_device']:>10,.0f} {r['AL_s']:>7.3f} {mfu:>6} {peak:>8} {eff:>6}")


def _count_gpus() -> int:
  try:
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
  except FileNotFoundError:  # no NVIDIA driver: one device (the CPU)
    return 1
  return max(1, len([ln for ln in r.stdout.splitlines() if ln.startswith("GPU ")])) if r.returncode == 0 else 1


if __name__ == "__main__":
  app.run(main)
