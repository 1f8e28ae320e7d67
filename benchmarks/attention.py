"""Attention-core benchmark: our Pallas flash kernel vs cuDNN vs XLA, forward and forward+backward.

  python benchmarks/attention.py                                   # full grid (S 2K/8K/32K, d 64/128/192, 14/2 12/2 16/2)
  python benchmarks/attention.py --seq=8192 --dims=128 --layouts=12/2 --configs=64x64x4x2,128x64x8x3
  python benchmarks/attention.py --json=/tmp/attn.json --impls=pallas,cudnn
  python benchmarks/attention.py --seq=8192 --dims=128 --layouts=12/2 --bias=t5   # T5 relative bias (or alibi)

Random bf16 inputs, causal. Each case is jitted once, run --warmup times, then timed --iters times with
jax.block_until_ready before reading the clock; the median is reported. cuDNN always runs in the same process as
the baseline ("vs cuDNN" column). d = 192 means MLA's 192 (q/k) / 128 (v) head dims; cuDNN pads v to 192.
--bias gives pallas and xla a logit bias (T5: 32 buckets, max distance 128, random table; ALiBi: the paper's
slopes); cuDNN takes none, so with a bias its column is the unbiased baseline.

FLOP convention: forward = 2*B*H*T*S*(Dqk + Dv) matmul FLOPs, backward = 2*B*H*T*S*(3*Dqk + 2*Dv) (recomputed
logits, dP, dV, dQ, dK); causal attention counts half of each (only the visible triangle is useful work), so
with Dqk = Dv = d: fwd = 2*B*H*S^2*d, fwd+bwd = 3.5x that. A sliding window counts the visible band instead.

Hook for other kernels (NSA later): `register("name", fn)` with fn(q, k, v) -> out, or call `time_attention`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from efficientllm_jax.kernels.flash import mosaic  # noqa: E402
from efficientllm_jax.models.attention import ops  # noqa: E402
from efficientllm_jax.models.positional import ALiBiBias, T5Bias, alibi_slopes  # noqa: E402

EXTRA: dict[str, Callable] = {}  # name -> fn(q, k, v) -> out; see register()


def register(name: str, fn: Callable) -> None:
  """Adds a kernel to every case of the grid (it is timed like the built-in ones; flops use the causal count)."""
  EXTRA[name] = fn


def time_attention(fn: Callable, q, k, v, do, *, mode: str, warmup: int = 2, iters: int = 10) -> float:
  """Median milliseconds of fn(q, k, v) ('fwd') or of its output and q/k/v gradients ('fwdbwd')."""
  if mode == "fwd":
    run = jax.jit(fn)
  else:
    def fwd_bwd(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(do)
    run = jax.jit(fwd_bwd)
  for _ in range(warmup):
    jax.block_until_ready(run(q, k, v))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(run(q, k, v))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def visible_pairs(t: int, s: int, window: int) -> float:
  """Number of (query, key) pairs a causal (windowed) self-attention of length t = s computes."""
  if not window or window >= s:
    return t * (t + 1) / 2
  return window * (window + 1) / 2 + (t - window) * window


def flops(b, h, s, dqk, dv, window, mode) -> float:
  pairs = b * h * visible_pairs(s, s, window)
  fwd = 2 * pairs * (dqk + dv)
  return fwd if mode == "fwd" else fwd + 2 * pairs * (3 * dqk + 2 * dv)


def parse_configs(text: str) -> list[ops.PallasBlocks]:
  """'64x64x4x2,128x64x8x3' -> block_q x block_k x num_warps x num_stages each."""
  out = []
  for item in filter(None, text.split(",")):
    bq, bk, w, st = (int(x) for x in item.split("x"))
    out.append(ops.PallasBlocks(block_q=bq, block_k=bk, num_warps=w, num_stages=st))
  return out


def make_bias(kind: str, h: int):
  if kind == "t5":
    return T5Bias(jax.random.normal(jax.random.key(5), (32, h)) * 0.5, 32, 128)
  if kind == "alibi":
    return ALiBiBias(jnp.asarray(alibi_slopes(h), jnp.float32))
  return None


def impls_for(args, dqk: int, window: int, h: int) -> dict[str, Callable]:
  scale = 1.0 / math.sqrt(dqk)
  fns: dict[str, Callable] = {}
  names = args.impls.split(",")
  bias = make_bias(args.bias, h)
  fns["cudnn"] = functools.partial(ops.cudnn_attention, scale=scale, window=window)  # the baseline, always
  if "pallas" in names:
    for blk in parse_configs(args.configs) or [ops.PallasBlocks()]:
      tag = f"pallas {blk.block_q}x{blk.block_k}x{blk.num_warps}x{blk.num_stages}"
      fns[tag] = functools.partial(ops.pallas_attention, scale=scale, window=window, blocks=blk, bias=bias)
  if "xla" in names:
    fns["xla"] = functools.partial(ops.xla_attention, scale=scale, window=window, bias=bias)
  if "mosaic" in names:  # kernels/flash/mosaic.py: causal, no bias or window (a case it cannot take is an error row)
    def mosaic_fn(q, k, v):
      why = mosaic.unsupported(q, k, v, window=window, bias=bias)
      if why:
        raise ValueError(why)
      blocks = ops.mosaic_blocks(dqk, q.shape[1])  # what impl=mosaic runs
      return mosaic.mosaic_attention(q, k, v, mosaic.MosaicParams(scale=scale, causal=True, blocks=blocks))
    fns["mosaic"] = mosaic_fn
  fns.update(EXTRA)
  return fns


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq", default="2048,8192,32768")
  ap.add_argument("--dims", default="64,128,192", help="head dims; 192 = MLA 192 (q/k) / 128 (v)")
  ap.add_argument("--layouts", default="14/2,12/2,16/2", help="query heads / K/V heads")
  ap.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // S)")
  ap.add_argument("--modes", default="fwd,fwdbwd")
  ap.add_argument("--impls", default="pallas,cudnn,xla",
                  help="cudnn always runs (baseline); also mosaic (the Mosaic GPU kernels, d 64/128, no bias)")
  ap.add_argument("--configs", default="", help="pallas tiles block_q x block_k x warps x stages, comma-separated")
  ap.add_argument("--window", type=int, default=0)
  ap.add_argument("--bias", default="none", choices=("none", "t5", "alibi"), help="logit bias (pallas, xla)")
  ap.add_argument("--xla-max-seq", type=int, default=8192, help="skip the (slow) xla path above this S")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--json", default="", help="also write the rows here")
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  print(f"# attention benchmark: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"causal, bf16, window {args.window}, bias {args.bias}, median of {args.iters}\n")
  print("| S | B | heads | dqk/dv | mode | impl | ms | TF/s | vs cuDNN |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for s in (int(x) for x in args.seq.split(",")):
    b = max(1, args.tokens // s)
    for d in (int(x) for x in args.dims.split(",")):
      dqk, dv = (192, 128) if d == 192 else (d, d)
      for layout in args.layouts.split(","):
        h, kvh = (int(x) for x in layout.split("/"))
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (b, s, h, dqk), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, s, kvh, dqk), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, s, kvh, dv), jnp.bfloat16)
        do = jax.random.normal(ks[3], (b, s, h, dv), jnp.bfloat16)
        for mode in args.modes.split(","):
          base_ms = None
          for name, fn in impls_for(args, dqk, args.window, h).items():
            if name == "xla" and s > args.xla_max_seq:
              continue
            row = dict(S=s, B=b, H=h, K=kvh, dqk=dqk, dv=dv, mode=mode, impl=name, window=args.window,
                       bias=args.bias)
            try:
              ms = time_attention(fn, q, k, v, do, mode=mode, warmup=args.warmup, iters=args.iters)
              tfs = flops(b, h, s, dqk, dv, args.window, mode) / (ms * 1e-3) / 1e12
              base_ms = ms if name == "cudnn" else base_ms
              rel = f"{base_ms / ms:.2f}x" if base_ms else "-"
              row.update(ms=ms, tflops=tfs)
              print(f"| {s} | {b} | {h}/{kvh} | {dqk}/{dv} | {mode} | {name} | {ms:.3f} | {tfs:.1f} | {rel} |",
                    flush=True)
            except Exception as e:  # noqa: BLE001  (one failing config must not hide the rest of the sweep)
              msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
              row.update(error=msg)
              print(f"| {s} | {b} | {h}/{kvh} | {dqk}/{dv} | {mode} | {name} | error: {msg} | | |", flush=True)
            rows.append(row)
            if args.json:  # after every row, so a run stopped by a time limit keeps what it measured
              Path(args.json).write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__, rows=rows),
                                                    indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
