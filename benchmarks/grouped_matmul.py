"""Grouped matmul for dropless MoE: the Pallas kernel (kernels/gmm, block configs swept) vs jax.lax.ragged_dot vs
a dense matmul of the same FLOPs, at the MoE 0.5Bx8 / 1.5Bx8 expert shapes, in one process.

Rows are routed tokens sorted by expert; group sizes come from a random top-2 routing over the experts (normal
router logits plus a per-expert bias of std --skew, so loads are uneven as a real router's). Inputs are random
bf16. Each case is timed after compile and warm-up, synchronised with block_until_ready, median of --repeats
timed runs. FLOPs are 2 * rows * K * N per matmul over the routed rows only (the kernel's extra work on tiles
that straddle an expert boundary is not counted); fwd+bwd is 3x that (dgrad + wgrad).

Passes: fwd (y = x @ w[g]), dgrad (dx = dy @ w[g]^T), wgrad (dw[e] = x_e^T dy_e), fwd+bwd (all three).
A pallas config is three tilings 'fwd/dgrad/wgrad', each 'block_m,block_n,block_k,num_warps,num_stages'
(wgrad: block_m is the row step, block_k x block_n the output tile); --configs takes several, space-separated.

  python benchmarks/grouped_matmul.py                                      # 0.5Bx8 and 1.5Bx8, default config
  python benchmarks/grouped_matmul.py --shapes=0.5Bx8 --configs="128,128,64,8,3/128,128,64,8,3/64,128,128,8,3 \\
      128,256,64,8,3/128,256,64,8,3/64,256,128,8,3"
  python benchmarks/grouped_matmul.py --shapes=custom --rows=256 --k=64 --n=96 --repeats=2   # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientllm_jax.kernels.gmm import GmmConfig, Tiling, grouped_matmul, transposed_grouped_matmul  # noqa: E402
from efficientllm_jax.kernels.gmm import gmm  # noqa: E402
from efficientllm_jax.bench import timing  # noqa: E402

# preset -> (routed rows, [(name, K, N)]): rows = seq 8192 x micro-batch x top-2.
SHAPES = {
    "0.5Bx8": (65536, [("up 896->4864", 896, 4864), ("gate+up 896->9728", 896, 9728), ("down 4864->896", 4864, 896)]),
    "1.5Bx8": (32768, [("up 1536->8960", 1536, 8960), ("down 8960->1536", 8960, 1536)]),
}
EXPERTS = 8


def parse_config(text: str) -> GmmConfig:
  parts = text.split("/")
  if len(parts) != 3:
    raise SystemExit(f"--configs item {text!r} must be three tilings fwd/dgrad/wgrad, each bm,bn,bk,warps,stages")
  return GmmConfig(*(Tiling.parse(p) for p in parts))


def routed_group_sizes(rows: int, experts: int, skew: float, seed: int = 0) -> np.ndarray:
  """Rows per expert of a top-2 routing of rows/2 tokens: normal logits + a per-expert bias of std `skew`."""
  rng = np.random.default_rng(seed)
  tokens = rows // 2
  logits = rng.standard_normal((tokens, experts)) + skew * rng.standard_normal(experts)
  top2 = np.argsort(-logits, axis=1)[:, :2]
  sizes = np.bincount(top2.reshape(-1), minlength=experts)
  sizes[np.argmax(sizes)] += rows - sizes.sum()  # odd rows: the busiest expert takes the remainder
  return sizes.astype(np.int32)


def time_fn(fn, args, *, warmup: int, repeats: int) -> float:
  return timing.median_seconds(fn, args, warmup=warmup, repeats=repeats)


def pass_fns(impl: str, sizes_e, cfg: GmmConfig | None):
  """pass name -> (fn(x, w, dy), matmuls' worth of FLOPs) for one implementation."""
  if impl == "dense":  # w is [K, N]: the FLOP-equivalent ceiling
    f = lambda x, w: x @ w
  elif impl == "ragged_dot":
    f = lambda x, w: jax.lax.ragged_dot(x, w, sizes_e)
  else:
    f = lambda x, w: gmm(x, w, sizes_e, config=cfg)

  def fwd(x, w, dy):
    return f(x, w)

  def fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(dy)

  fns = {"fwd": (fwd, 1), "fwd+bwd": (fwd_bwd, 3)}
  if impl == "pallas":  # the two backward kernels alone, each with its own tiling
    fns["dgrad"] = (lambda x, w, dy: grouped_matmul(dy, w, sizes_e, transpose_rhs=True, tiling=cfg.dlhs), 1)
    fns["wgrad"] = (lambda x, w, dy: transposed_grouped_matmul(x, dy, sizes_e, w.shape[0], tiling=cfg.drhs), 1)
  return fns


def fwd_bwd_outputs(f, x, w, dy):
  """(y, dx, dw) of f as float32 numpy arrays."""
  def both(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))
  return [np.asarray(a, np.float32) for a in jax.jit(both)(x, w, dy)]


def check(got, want) -> str:
  """Relative errors of the kernel's y, dx, dw against ragged_dot's (bf16 outputs: ~1e-3 expected)."""
  errs = [f"{name} {np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30):.1e}"
          for name, a, b in zip(("y", "dx", "dw"), got, want)]
  return "rel err vs ragged_dot: " + ", ".join(errs)


def run_shape(name, rows, k, n, sizes, cfgs, args, dt):
  sizes_e = jnp.asarray(sizes)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (rows, k), dt)
  w = (jax.random.normal(keys[1], (EXPERTS, k, n), dt) / np.sqrt(k)).astype(dt)
  dy = jax.random.normal(keys[2], (rows, n), dt)
  flops = 2.0 * rows * k * n
  impls = [("dense", None, (x, w[0], dy)), ("ragged_dot", None, (x, w, dy))]
  impls += [("pallas", c, (x, w, dy)) for c in cfgs]
  dense_tfs = {}
  want = fwd_bwd_outputs(lambda a, b: jax.lax.ragged_dot(a, b, sizes_e), x, w, dy)
  for impl, cfg, fargs in impls:
    label = impl if cfg is None else f"pallas {cfg.fwd}/{cfg.dlhs}/{cfg.drhs}"
    if impl == "pallas":
      try:
        got = fwd_bwd_outputs(lambda a, b, cfg=cfg: gmm(a, b, sizes_e, config=cfg), x, w, dy)
        print(f"  {label}: {check(got, want)}", flush=True)
      except Exception as e:  # noqa: BLE001 - one bad tiling must not stop the sweep
        print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
    for pass_name, (fn, mult) in pass_fns(impl, sizes_e, cfg).items():
      if args.passes and pass_name not in args.passes.split(",") and impl == "pallas":
        continue
      if impl == "ragged_dot" and pass_name == "fwd+bwd" and args.skip_ragged_bwd:
        continue
      try:
        s = time_fn(jax.jit(fn), fargs, warmup=args.warmup, repeats=args.repeats)
      except Exception as e:  # noqa: BLE001
        print(f"{name:<22}{pass_name:<9}{label:<60} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      tfs = mult * flops / s / 1e12
      if impl == "dense":
        dense_tfs[pass_name] = tfs
      ref = dense_tfs.get(pass_name, dense_tfs.get("fwd"))
      rel = f"{tfs / ref * 100:>7.1f}%" if ref else ""
      print(f"{name:<22}{pass_name:<9}{label:<60}{s * 1e3:>10.3f}{tfs:>9.1f}{rel}", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="0.5Bx8,1.5Bx8", help="comma list of 0.5Bx8, 1.5Bx8, custom")
  ap.add_argument("--rows", type=int, default=512, help="custom: routed rows")
  ap.add_argument("--k", type=int, default=128, help="custom: contraction dim")
  ap.add_argument("--n", type=int, default=256, help="custom: output dim")
  ap.add_argument("--configs", default=None, help="space-separated pallas configs fwd/dgrad/wgrad (default: kernel's)")
  ap.add_argument("--skew", type=float, default=0.3, help="std of the per-expert router bias (load imbalance)")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--skip_ragged_bwd", action="store_true", help="skip ragged_dot fwd+bwd (slow; already known)")
  ap.add_argument("--passes", default="", help="pallas passes to time, e.g. fwd,fwd+bwd (default: all four)")
  args = ap.parse_args()
  cfgs = [parse_config(c) for c in args.configs.split()] if args.configs else [GmmConfig()]
  dt = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}) | jax {jax.__version__} | {args.dtype} | "
        f"{EXPERTS} experts | median of {args.repeats} after {args.warmup} warm-up")
  for preset in args.shapes.split(","):
    if preset == "custom":
      rows, shapes = args.rows, [(f"{args.k}->{args.n}", args.k, args.n)]
    elif preset in SHAPES:
      rows, shapes = SHAPES[preset]
    else:
      raise SystemExit(f"--shapes: unknown {preset!r}; use {', '.join(SHAPES)} or custom")
    sizes = routed_group_sizes(rows, EXPERTS, args.skew)
    print(f"\n== {preset}: {rows} routed rows, group sizes {sizes.tolist()} (max/mean "
          f"{sizes.max() / sizes.mean():.2f})")
    print(f"{'matmul':<22}{'pass':<9}{'impl':<60}{'ms':>10}{'TF/s':>9}{'  % dense'}")
    for name, k, n in shapes:
      run_shape(name, rows, k, n, sizes, cfgs, args, dt)


if __name__ == "__main__":
  main()
