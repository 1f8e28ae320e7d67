"""Yardstick for issue 10's flash goal: JAX's stock Mosaic GPU attention (FlashAttention-3 style) vs cuDNN.

  python benchmarks/mosaic_attention_yardstick.py              # GPU only (Hopper): d128 12/2 B2 and d64 14/2 B4, S 8K

`jax.experimental.pallas.ops.gpu.attention_mgpu` (TMA, wgmma, warp specialisation) hard-codes fp16 shared
memory, so both sides get fp16 inputs. Its backward exists only without a causal mask, so forward+backward is
timed non-causal. Median of 10 runs after 2 warm-ups, each ended by block_until_ready. FLOPs: forward
4·B·H·S²·d (halved when causal), forward+backward 3.5 × that. Figures: benchmarks/RESULTS.md, session 6.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def bench(f, *args, iters: int = 10) -> float:
  for _ in range(2):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def fwd_bwd(fn, do):
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return jax.jit(run)


def main() -> int:
  if jax.default_backend() != "gpu":
    print("needs a GPU (Mosaic GPU kernels compile for Hopper)")
    return 1
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am  # noqa: PLC0415 - GPU-only import

  def cudnn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

  rows = []
  for b, h, kv, d in ((2, 12, 2, 128), (4, 14, 2, 64)):
    s = 8192
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float16)
    k = jax.random.normal(keys[1], (b, s, kv, d), jnp.float16)
    v = jax.random.normal(keys[2], (b, s, kv, d), jnp.float16)
    do = jax.random.normal(keys[3], (b, s, h, d), jnp.float16)
    for causal in (True, False):
      flops = 4 * b * h * s * s * d / (2 if causal else 1)
      case = (b, f"{h}/{kv}", d, causal)
      t = bench(jax.jit(functools.partial(cudnn, causal=causal)), q, k, v)
      rows.append((*case, "cudnn", "fwd", t, flops / t / 1e9))
      for block_kv in (128, 64):
        cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal)
        t = bench(jax.jit(functools.partial(am.attention, config=cfg)), q, k, v)
        rows.append((*case, f"mosaic block_kv {block_kv}", "fwd", t, flops / t / 1e9))
      t = bench(fwd_bwd(functools.partial(cudnn, causal=causal), do), q, k, v)
      rows.append((*case, "cudnn", "fwd+bwd", t, 3.5 * flops / t / 1e9))
      if causal:
        continue  # the stock backward raises NotImplementedError under a causal mask
      for blocks in ((64, 64, 64, 64), (64, 128, 64, 128), (128, 128, 64, 64)):
        cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=False,
                              block_q_dkv=blocks[0], block_kv_dkv=blocks[1], block_q_dq=blocks[2],
                              block_kv_dq=blocks[3])
        t = bench(fwd_bwd(functools.partial(am.attention, config=cfg), do), q, k, v)
        rows.append((*case, f"mosaic bwd blocks {blocks}", "fwd+bwd", t, 3.5 * flops / t / 1e9))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| B | heads | d | causal | impl | pass | ms | TF/s |\n|---|---|---|---|---|---|---:|---:|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.3f} | {r[7]:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
