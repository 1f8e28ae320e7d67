"""Benchmark: the NSA core (compressed + selected + window branches and the gates) with the Pallas kernels
(attention.nsa.impl=pallas) and the pure-JAX reference, against full causal cuDNN attention of the same shape.

Shapes: B=1, H=12 query heads, K=2 kv heads, head dim 128 (1.5B), EfficientLLM NSA setting l=64, d=32, l'=64,
n=4, w=128 (configs/base.py), T in --seqs. Inputs are random bf16 q [B,T,H,D], compressed k/v [B,T/d,K,D],
selected and window k/v [B,T,K,D], gates [B,T,H,3]; forward and forward+backward (gradients for every input).
Timing: compile + 2 warm-up calls, then the median of --iters timed calls (block_until_ready each).
FLOPs (TF/s column): cuDNN = 4*B*H*D*T^2/2 forward (causal); NSA = 4*B*H*D * attended tokens summed over
queries and branches (nsa.attended_tokens); forward+backward = 3x forward (recomputation not counted).

  python -m benchmarks.attention_nsa                                   # 8K, 32K, 64K; pallas, reference, cuDNN
  python -m benchmarks.attention_nsa --seqs 65536 --impls pallas \\
      --blocks "" "cmp_q=16,slc_q=4" "cmp_chunk=64,slc_chunk=16" "num_warps=8,num_stages=3"   # Blocks sweep
  (Blocks fields: cmp_q, cmp_k, slc_q, cmp_chunk, slc_chunk, dkdv_items, num_warps, num_stages; "" = defaults)
  python -m benchmarks.attention_nsa --breakdown                       # per-piece ms of the Pallas path
  python -m benchmarks.attention_nsa --seqs 65536 --impls pallas --profile 3   # kernel-level trace breakdown
  python -m benchmarks.attention_nsa --seqs 256 --heads 4 --head-dim 32 --iters 2 --cpu   # CPU smoke run
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from efficientllm_jax.bench import timing
from efficientllm_jax.kernels import nsa as nsa_kernels
from efficientllm_jax.models.attention import nsa, ops


def time_call(fn, args, iters: int) -> float:
  """Median ms per call after compile and two warm-up calls."""
  return 1e3 * timing.median_seconds(fn, args, warmup=2, repeats=iters)


def parse_blocks(text: str) -> nsa_kernels.Blocks:
  kw = dict(item.split("=") for item in text.split(",") if item)
  return nsa_kernels.Blocks(**{k: int(v) for k, v in kw.items()})


def nsa_core(impl: str, geom: dict, window: int, blocks, window_impl: str):
  """(q, kc, vc, ks, vs, kw, vw, gates) -> [B, T, H, D]: the three branches mixed by the gates."""
  def core(q, kc, vc, ks, vs, kw, vw, gates):
    if impl == "pallas":
      o_cmp, o_slc, _ = nsa.sparse_branches_pallas(q, kc, vc, ks, vs, blocks=blocks, **geom)
    else:
      ends = jnp.arange(kc.shape[1]) * geom["compress_stride"] + geom["compress_block"] - 1
      o_cmp, o_slc, _ = nsa.sparse_branches(q, kc, vc, ends, ks, vs, **geom)
    o_win = ops.attention(q, kw, vw, impl=window_impl, window=window)
    g = gates.astype(q.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
  return core


def full_causal(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def fwd_bwd(f, n_args: int):
  """Jitted loss and gradients for all n_args inputs."""
  loss = lambda *args: jnp.sum(f(*args).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_args))))


def breakdown(args, geom, window, blocks, window_impl):
  """fwd+bwd ms of each Pallas piece alone (selection ids fixed from one forward)."""
  q, kc, vc, ks, vs, kw, vw, _ = args
  t = q.shape[1]
  kg = dict(compress_block=geom["compress_block"], compress_stride=geom["compress_stride"], blocks=blocks)
  grad = lambda f, n: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=tuple(range(n))))
  _, lse = nsa_kernels.compressed_attention(q, kc, vc, **kg)
  score_f = jax.jit(lambda q, kc, lse: nsa_kernels.select_top(
      q, kc, lse, select_block=geom["select_block"], num_selected=geom["num_selected"],
      local_blocks=geom["local_blocks"], **kg))
  idx = score_f(q, kc, lse)
  score = jax.jit(lambda q, kc, lse: nsa_kernels.selection_scores(q, kc, lse, select_block=geom["select_block"],
                                                                  **kg))
  top = jax.jit(lambda s: nsa.select_blocks(s, jnp.arange(t), select_block=geom["select_block"],
                                            num_selected=geom["num_selected"], local_blocks=geom["local_blocks"]))
  tq = nsa_kernels.kernel._geometry_rows(t, q.shape[2], ks.shape[2], blocks.slc_q)[2]
  lists = jax.jit(lambda i: nsa_kernels.kernel.slc_lists(i, -(-t // tq) * tq, -(-t // geom["select_block"]), tq,
                                                         blocks.slc_chunk, blocks.dkdv_items))
  slc = lambda q, ks, vs: nsa_kernels.selected_attention(q, ks, vs, idx, select_block=geom["select_block"],
                                                         blocks=blocks)
  win = lambda q, kw, vw: ops.attention(q, kw, vw, impl=window_impl, window=window)
  return {
      "cmp fwd+bwd": time_call(grad(lambda q, kc, vc: nsa_kernels.compressed_attention(q, kc, vc, **kg)[0], 3),
                               (q, kc, vc), 10),
      "select_top (fused)": time_call(score_f, (q, kc, lse), 10),
      "  unfused: scores": time_call(score, (q, kc, lse), 10),
      "  unfused: XLA top-k": time_call(top, (score(q, kc, lse),), 10),
      "slc lists": time_call(lists, (idx,), 10),
      "slc fwd": time_call(jax.jit(slc), (q, ks, vs), 10),
      "slc fwd+bwd": time_call(grad(slc, 3), (q, ks, vs), 10),
      "win fwd+bwd": time_call(grad(win, 3), (q, kw, vw), 10),
  }


def profile_fwd_bwd(fn, args, steps: int, top: int = 30) -> str:
  """Trace `steps` calls of fn (after one compile call) and format the device time per call by kernel."""
  import tempfile  # noqa: PLC0415

  from efficientllm_jax.bench import profile  # noqa: PLC0415
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    return profile.format_summary(profile.summarize(profile.find_trace(d), steps, top=top))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 65536])
  p.add_argument("--impls", nargs="+", default=["pallas", "reference"], choices=["pallas", "reference"])
  p.add_argument("--reference-max", type=int, default=32768, help="skip the reference above this T (slow)")
  p.add_argument("--blocks", nargs="+", default=[""], help="Blocks overrides, e.g. cmp_q=16,cmp_k=64,slc_q=16")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--geometry", default="64,32,64,4,128,2", help="l,d,l',n,w,local_blocks")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--breakdown", action="store_true")
  p.add_argument("--profile", type=int, default=0, help="pallas: trace this many fwd+bwd calls, print kernel times")
  p.add_argument("--cpu", action="store_true", help="no cuDNN: xla window branch and no baseline (smoke run)")
  p.add_argument("--window-impl", default="auto", choices=["auto", "cudnn", "pallas", "xla"],
                 help="attention.impl of the window branch (auto: what the model would pick)")
  a = p.parse_args()
  l, d, ls, n, w, local = (int(x) for x in a.geometry.split(","))
  geom = dict(compress_block=l, compress_stride=d, select_block=ls, num_selected=n, local_blocks=local)
  dt = jnp.float32 if a.cpu else jnp.bfloat16
  print(f"device: {jax.devices()[0].device_kind}; B={a.batch} H={a.heads} K={a.kv_heads} D={a.head_dim} "
        f"l={l} d={d} l'={ls} n={n} w={w}")
  print(f"{'T':>6} {'impl':>10} {'blocks':>34} {'fwd ms':>9} {'TF/s':>6} {'f+b ms':>9} {'TF/s':>6} "
        f"{'speed-up f / f+b vs cuDNN':>26}")
  for t in a.seqs:
    rng = np.random.default_rng(t)
    nc = nsa.num_compressed(t, l, d)
    shape = lambda *s: jnp.asarray(rng.standard_normal(s), dt)
    q = shape(a.batch, t, a.heads, a.head_dim)
    kv = lambda m: shape(a.batch, m, a.kv_heads, a.head_dim)
    args = (q, kv(nc), kv(nc), kv(t), kv(t), kv(t), kv(t), shape(a.batch, t, a.heads, 3))
    fl = 4 * a.batch * a.heads * a.head_dim
    base = None
    if not a.cpu:
      fl_full = fl * t * (t + 1) / 2
      k, v = kv(t), kv(t)
      base = (time_call(jax.jit(full_causal), (q, k, v), a.iters), time_call(fwd_bwd(full_causal, 3), (q, k, v), a.iters))
      print(f"{t:>6} {'cuDNN full':>10} {'':>34} {base[0]:9.3f} {fl_full / base[0] / 1e9:6.0f} {base[1]:9.3f} "
            f"{3 * fl_full / base[1] / 1e9:6.0f}")
    counts = nsa.attended_tokens(t, compress_block=l, compress_stride=d, select_block=ls, num_selected=n, window=w)
    fl_nsa = fl * sum(int(c.sum()) for c in counts.values())
    for impl in a.impls:
      if impl == "reference" and t > a.reference_max:
        print(f"{t:>6} {impl:>10} skipped (T > --reference-max {a.reference_max})")
        continue
      for btxt in (a.blocks if impl == "pallas" else [""]):
        blocks = parse_blocks(btxt)
        core = nsa_core(impl, geom, w, blocks, "xla" if a.cpu else a.window_impl)
        try:
          ms = (time_call(jax.jit(core), args, a.iters), time_call(fwd_bwd(core, 8), args, a.iters))
        except Exception as e:  # noqa: BLE001  (an OOM or lowering failure is a result of the sweep)
          print(f"{t:>6} {impl:>10} {btxt or 'default':>34} failed: {type(e).__name__}: {str(e)[:200]}")
          continue
        up = f"{base[0] / ms[0]:6.2f}x / {base[1] / ms[1]:6.2f}x" if base else ""
        print(f"{t:>6} {impl:>10} {btxt or 'default':>34} {ms[0]:9.3f} {fl_nsa / ms[0] / 1e9:6.1f} {ms[1]:9.3f} "
              f"{3 * fl_nsa / ms[1] / 1e9:6.1f} {up:>26}", flush=True)
        if a.profile and impl == "pallas":
          print(profile_fwd_bwd(fwd_bwd(core, 8), args, a.profile), flush=True)
        if a.breakdown and impl == "pallas":
          for name, v in breakdown(args, geom, w, blocks, "xla" if a.cpu else a.window_impl).items():
            print(f"{'':>6} {'':>10} {name:>34} {v:9.3f} ms")


if __name__ == "__main__":
  main()
