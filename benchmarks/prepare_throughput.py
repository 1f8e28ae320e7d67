"""Throughput of `python -m efficientllm_jax.data.prepare` on generated jsonl, with the byte tokenizer and with a
32k byte-level BPE tokenizer.json (trained here on a sample of the same data).

  python benchmarks/prepare_throughput.py [--mb=300] [--workers=0] [--dir=/tmp/prepare_bench]

The corpus is windows of the running Python's standard-library sources (code and docstrings), ~2-20 KB documents,
one JSON object per line. Prints input MB/s and tokens/s over wall time and per CPU-second (all processes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientllm_jax.data import prepare, tokenizer as tokenizer_lib  # noqa: E402


def generate(path: Path, mb: float, seed: int = 0) -> None:
  rng = random.Random(seed)
  lines = []
  for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
    try:
      lines += p.read_text().splitlines()
    except (UnicodeDecodeError, OSError):
      continue
  size = 0
  with open(path, "w") as f:
    while size < mb * 1e6:
      n = rng.randint(40, 400)
      s = rng.randrange(0, len(lines) - n)
      line = json.dumps({"text": "\n".join(lines[s:s + n]), "id": size}) + "\n"
      f.write(line)
      size += len(line.encode())


def cpu_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, data: Path, tokenizer: str, out: Path, workers: int) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  c0, t0 = cpu_seconds(), time.perf_counter()
  meta = prepare.prepare([str(data)], out, prepare.Options(tokenizer, 8192), workers=workers, stream=io.StringIO())
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  mb = meta["input_bytes"] / 1e6
  row = {"tokenizer": name, "MB": round(mb, 1), "tokens": meta["tokens"], "wall_s": round(wall, 1),
         "cpu_s": round(cpu, 1), "MB/s": round(mb / wall, 2), "Mtok/s": round(meta["tokens"] / wall / 1e6, 2),
         "MB/cpu-s": round(mb / cpu, 2), "Mtok/cpu-s": round(meta["tokens"] / cpu / 1e6, 2)}
  print(json.dumps(row), flush=True)
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", type=float, default=300)
  ap.add_argument("--workers", type=int, default=0, help="0 = one per CPU")
  ap.add_argument("--dir", default="/tmp/prepare_bench")
  args = ap.parse_args()
  root = Path(args.dir)
  root.mkdir(parents=True, exist_ok=True)
  data = root / "data.jsonl"
  if not data.exists() or data.stat().st_size < args.mb * 1e6 * 0.99:
    generate(data, args.mb)
  tok_dir = root / "bpe32k"
  if not (tok_dir / "tokenizer.json").exists():
    with open(data) as f:  # the BPE is trained on the first ~25 MB
      sample = [json.loads(line)["text"] for line, _ in zip(f, range(3000))]
    tok_dir.mkdir(exist_ok=True)
    tokenizer_lib.train_bpe(sample, 32768).save(str(tok_dir / "tokenizer.json"))
  print(f"{os.cpu_count()} CPUs, workers={args.workers or os.cpu_count()}, seq_len 8192, {data}")
  measure("bytes", data, "bytes", root / "out-bytes", args.workers)
  measure("bpe32k", data, str(tok_dir), root / "out-bpe", args.workers)


if __name__ == "__main__":
  main()
