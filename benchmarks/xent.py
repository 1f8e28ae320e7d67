"""The loss kernel (kernels/xent, `train.loss_impl=pallas`) against the XLA loss pass it replaces, on one chunk.

Both take the same bf16 logits [rows, vocab] (random normal times 4, not zeros), int32 targets and a 0/1 mask and
return the log-sum-exp, the target logit and dlogits (bf16):
  xla     train/loss.py's `xla_rows` (the train.loss_impl=xla pass: one-pass log-sum-exp, then dlogits)
  pallas  softmax_xent with each --configs entry 'block_v,num_warps[,num_stages[,evict]]' (evict 1, the default:
          the kernel's L2 eviction hints; 0: none)
Each is jitted, run once to compile and --warmup times, then the median of --repeats synchronised runs
(efficientllm_jax/bench/timing.py). GB/s counts the least traffic the work needs, one read of the logits and one
write of dlogits, so both columns are comparable (the kernel itself reads twice). Every pallas config is also
checked against xla (max abs difference of each output).

  python benchmarks/xent.py                                              # the 0.5B chunk: 8192 x 151936
  python benchmarks/xent.py --configs="1024,4 2048,4 4096,8 8192,8 2048,4,2"
  python benchmarks/xent.py --configs="2048,4,1,0 2048,4,1,1"   # without and with the L2 eviction hints
  python benchmarks/xent.py --rows=16 --vocab=1000 --configs="256,4" --repeats=2   # CPU (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficientllm_jax.bench import timing  # noqa: E402
from efficientllm_jax.kernels.xent import softmax_xent  # noqa: E402
from efficientllm_jax.train.loss import xla_rows  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rows", type=int, default=8192, help="logit rows (tokens of one loss chunk)")
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--configs", default="2048,4 4096,4 4096,8",
                  help="space-separated 'block_v,num_warps[,num_stages[,evict]]' entries")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  configs = []
  for entry in args.configs.split():
    parts = entry.split(",")
    try:
      if len(parts) not in (2, 3, 4):
        raise ValueError
      bv, warps, stages, evict = (int(p) for p in parts + ["1", "1"][len(parts) - 2:])
    except ValueError:
      raise SystemExit(f"--configs entry {entry!r} must be 'block_v,num_warps[,num_stages[,evict]]' (e.g. 2048,4 or "
                       "2048,4,2 or 2048,4,1,0)") from None
    configs.append((bv, warps, stages, evict))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.rows, args.vocab)).astype(np.float32) * 4, jnp.bfloat16)
  y = jnp.asarray(rng.integers(0, args.vocab, args.rows), jnp.int32)
  m = jnp.asarray((rng.random(args.rows) > 0.05).astype(np.float32))
  gb = 2 * x.size * x.dtype.itemsize / 1e9
  dev = jax.devices()[0]
  print(f"{dev.device_kind}: logits [{args.rows}, {args.vocab}] bf16, median of {args.repeats}")
  ref = jax.jit(lambda a, b, c: xla_rows(a, b, c, a.dtype))
  rows = [("xla (one-pass lse + dlogits)", timing.median_seconds(ref, (x, y, m), warmup=args.warmup,
                                                                  repeats=args.repeats))]
  want = ref(x, y, m)
  for bv, warps, stages, evict in configs:
    fn = jax.jit(functools.partial(softmax_xent, block_v=bv, num_warps=warps, num_stages=stages, evict=bool(evict)))
    label = f"{bv},{warps},{stages},{evict}"
    got = fn(x, y, m)
    diffs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in zip(got, want)]
    print(f"pallas {label} vs xla, max abs difference: lse {diffs[0]:.2e}, target {diffs[1]:.2e}, "
          f"dlogits {diffs[2]:.2e}")
    rows.append((f"pallas block_v {bv}, {warps} warps, {stages} stages{', L2 hints' if evict else ''}",
                 timing.median_seconds(fn, (x, y, m), warmup=args.warmup, repeats=args.repeats)))
  base = rows[0][1]
  print("\n| pass | ms | GB/s (1 read + 1 write) | × xla |\n|---|---:|---:|---:|")
  for name, s in rows:
    print(f"| {name} | {s * 1e3:.3f} | {gb / s:.0f} | {base / s:.2f} |")


if __name__ == "__main__":
  main()
