"""One way to time a jitted call on an accelerator, shared by the harnesses in benchmarks/."""

from __future__ import annotations

import statistics
import time

import jax

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles


def median_seconds(fn, args, *, warmup: int = 2, repeats: int = 10, iters: int = 1) -> float:
  """Median wall seconds per call of fn(*args): the compile call and `warmup` calls are left out, and each of the
  `repeats` samples times `iters` back-to-back calls ended by block_until_ready (device work synchronised before
  the clock is read)."""
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)
