"""Micro-benchmark: jax.lax.ragged_dot (the dropless MoE expert matmul) vs dense matmuls of the same FLOPs.

Default shapes are MoE 0.5Bx8 at seq 8192, micro-batch 4: 32768 tokens x top-2 = 65536 routed rows, hidden 896,
expert width 4864, 8 experts. For each projection (up: 896 -> 4864, down: 4864 -> 896) and pass (forward;
dgrad and wgrad, the two backward matmuls alone; forward + backward, 3x the FLOPs) it times
  dense    one [rows, K] @ [K, N] matmul (the FLOP-equivalent ceiling)
  batched  [E, rows/E, K] @ [E, K, N] (what capacity-based dispatch runs)
  ragged   jax.lax.ragged_dot with group sizes summing to rows (what dropless dispatch runs)
  mgpu     (forward only, Hopper) the Pallas Mosaic GPU ragged_dot in jax.experimental, when it runs here
on random data, after compile and warm-up calls, synchronising with block_until_ready, median of --repeats
timed batches of --iters calls each. Prints ms per call and TF/s (2 * rows * K * N per matmul).

  python benchmarks/moe_ragged_dot.py                      # 0.5Bx8 shapes, bf16, balanced groups
  python benchmarks/moe_ragged_dot.py --groups random      # uneven expert loads (Dirichlet)
  python benchmarks/moe_ragged_dot.py --rows 2048 --d 128 --f 384 --iters 2   # CPU smoke run
  XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=false python benchmarks/moe_ragged_dot.py  # no cuDNN
(Recent XLA lowers ragged_dot forward and dgrad to cuDNN grouped matmuls on sm80+ with cuDNN >= 9.22 and
rewrites the rest, wgrad included, to zero-padded dense dots: E times the FLOPs. The per-pass rows show which.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from efficientllm_jax.bench import timing  # noqa: E402


def group_sizes(rows: int, experts: int, kind: str, seed: int = 0) -> np.ndarray:
  if kind == "balanced":
    sizes = np.full(experts, rows // experts)
  else:  # random loads, as an imperfectly balanced router gives
    p = np.random.default_rng(seed).dirichlet(np.full(experts, 4.0))
    sizes = np.floor(p * rows).astype(int)
  sizes[-1] += rows - sizes.sum()
  return sizes.astype(np.int32)


def time_call(fn, args, *, warmup: int, iters: int, repeats: int) -> float:
  """Median seconds per call; compile and warm-up excluded, device work synchronised."""
  return timing.median_seconds(fn, args, warmup=warmup, repeats=repeats, iters=iters)


def passes(f):
  """name -> (fn(a, b, ct), matmuls' worth of FLOPs): forward, each backward matmul alone, and all three."""
  def fwd(a, b, ct):
    return f(a, b)

  def dgrad(a, b, ct):  # d lhs: ragged in the output rows (cuDNN-able in recent XLA)
    return jax.vjp(lambda a_: f(a_, b), a)[1](ct)

  def wgrad(a, b, ct):  # d rhs: ragged in the contracting dim (the mode XLA may rewrite to a padded dense dot)
    return jax.vjp(lambda b_: f(a, b_), b)[1](ct)

  def fwd_bwd(a, b, ct):
    y, vjp = jax.vjp(f, a, b)
    return y, vjp(ct)
  return {"fwd": (fwd, 1), "dgrad": (dgrad, 1), "wgrad": (wgrad, 1), "fwd+bwd": (fwd_bwd, 3)}


def mgpu_ragged(sizes_e):
  """The jax.experimental Mosaic GPU ragged_dot (Hopper), or None with the reason when it cannot run here."""
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  except Exception as e:  # noqa: BLE001 - report any import failure
    return None, f"import failed: {e}"
  if jax.default_backend() != "gpu":
    return None, "needs a GPU"

  def f(a, b):
    return ragged_dot_mgpu.ragged_dot(a, b, group_sizes=sizes_e, block_m=128, block_n=128, block_k=64,
                                      max_concurrent_steps=4, grid_block_n=1)
  return f, ""


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=65536)
  ap.add_argument("--d", type=int, default=896, help="hidden size")
  ap.add_argument("--f", type=int, default=4864, help="expert width")
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--groups", default="balanced", choices=("balanced", "random"))
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  dt = jnp.dtype(args.dtype)
  e, rows = args.experts, args.rows
  if rows % e:
    raise SystemExit(f"--rows={rows} must be divisible by --experts={e} (the batched case splits rows evenly)")
  sizes = group_sizes(rows, e, args.groups)
  sizes_e = jnp.asarray(sizes)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}) | jax {jax.__version__} | {args.dtype} | "
        f"rows {rows} | experts {e} | group sizes {sizes.tolist()} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  keys = jax.random.split(jax.random.key(0), 6)
  print(f"{'projection':<18}{'pass':<10}{'impl':<9}{'ms':>10}{'TF/s':>9}{'vs dense':>10}")
  for name, k, n in (("up   %d->%d" % (args.d, args.f), args.d, args.f),
                     ("down %d->%d" % (args.f, args.d), args.f, args.d)):
    x = jax.random.normal(keys[0], (rows, k), dt)
    w_ekn = (jax.random.normal(keys[1], (e, k, n), dt) / np.sqrt(k)).astype(dt)
    ct = jax.random.normal(keys[2], (rows, n), dt)
    impls = {
        "dense": (lambda a, b: a @ b, (x, w_ekn[0])),
        "batched": (lambda a, b: jnp.einsum("eck,ekn->ecn", a.reshape(e, rows // e, k), b).reshape(rows, n),
                    (x, w_ekn)),
        "ragged": (lambda a, b: jax.lax.ragged_dot(a, b, sizes_e), (x, w_ekn)),
    }
    if args.groups == "random":
      del impls["batched"]  # only meaningful for equal groups
    mg, why = mgpu_ragged(sizes_e)
    flops = 2.0 * rows * k * n
    for pass_name in ("fwd", "dgrad", "wgrad", "fwd+bwd"):
      base = None
      for impl, (f, fargs) in impls.items():
        fn, mult = passes(f)[pass_name]
        s = time_call(jax.jit(fn), (*fargs, ct), warmup=args.warmup, iters=args.iters, repeats=args.repeats)
        base = base or s
        print(f"{name:<18}{pass_name:<10}{impl:<9}{s * 1e3:>10.3f}{mult * flops / s / 1e12:>9.2f}{s / base:>9.2f}x")
      if pass_name != "fwd":
        continue
      if mg is None:
        print(f"{name:<18}{pass_name:<10}{'mgpu':<9}  skipped: {why}")
        continue
      try:
        y = jax.jit(mg)(x, w_ekn)
        ref = jax.jit(lambda a, b: jax.lax.ragged_dot(a, b, sizes_e))(x, w_ekn)
        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
        s = time_call(jax.jit(mg), (x, w_ekn), warmup=args.warmup, iters=args.iters, repeats=args.repeats)
        print(f"{name:<18}{pass_name:<10}{'mgpu':<9}{s * 1e3:>10.3f}{flops / s / 1e12:>9.2f}{s / base:>9.2f}x"
              f"  (max |diff| vs ragged {err:.3g})")
      except Exception as ex:  # noqa: BLE001 - an experimental kernel: report and go on
        print(f"{name:<18}{pass_name:<10}{'mgpu':<9}  failed: {type(ex).__name__}: {str(ex)[:160]}")

if __name__ == "__main__":
  main()
