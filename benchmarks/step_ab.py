"""Train-step A/B in one process: several configs, their timed steps interleaved round by round.

  python benchmarks/step_ab.py --config=configs/base.py:0.5B \\
      --set="model.scan_layers=False" --set="train.logits_dtype=bfloat16" --set="train.loss_chunk=8192" \\
      --variant="model.remat=dots_attention" --variant="" --rounds=3 --steps=6 --profile=2
  python benchmarks/step_ab.py --config=configs/base.py:tiny --set=train.micro_batch=2 \\
      --variant="model.remat=none" --variant="model.remat=full" --rounds=2 --steps=1  # CPU

Why: two processes of benchmarks/throughput.py, one after the other, differ by 1-3 % on the same H200, and
machines by more. The card runs our steps at its 700 W power cap with the SM clock dropping from 1980 to ~1600
MHz (benchmarks/RESULTS.md, session 10), so a run's speed depends on how hot and how loaded the card has been.
Here every variant is compiled first (each keeps its own train state on the device: the peak memory is the sum
of the states plus the largest step's), then each round times --steps steps of every variant, the order reversed
every other round, so slow drift hits all variants alike. The first variant is the baseline of the table's
ratio column.

--variant (repeatable) is one set of keys separated by ';' on top of --config and --set, as throughput.py's
--override (`config=FILE:ARG` starts from another config file). A bad key or value stops before any compile.
Per variant: median and min ms a step over the rounds, the rounds themselves, mean board power and energy a step
over its timed steps (NVML, n/a without it), and with --profile N a device-time breakdown of N traced steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402 - config parsing, power meter (puts the repo root on sys.path)


def build_variant(args, variant: str) -> dict:
  import jax  # noqa: PLC0415

  from efficientllm_jax.train import step as step_lib  # noqa: PLC0415
  cfg = tp.build_config(args.config, args.set, tp.parse_override(variant))
  t0 = time.perf_counter()
  built = step_lib.build(cfg)
  batches = tp.random_batches(cfg, built)
  state, metrics = built.train_step(built.state, batches[0])
  first = float(jax.device_get(metrics["loss"]))
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = built.train_step(state, batches[(i + 1) % 2])
  jax.block_until_ready(state)
  name = variant or "(shared config)"
  print(f"{name}: built and compiled in {compile_s:.0f} s, first loss {first:.4f}", flush=True)
  return {"name": name, "cfg": cfg, "step": built.train_step, "state": state, "batches": batches, "ms": [],
          "power_W": [], "energy_J_per_step": [], "compile_s": compile_s, "loss_first": first}


def time_steps(v: dict, steps: int) -> float:
  import jax  # noqa: PLC0415
  state = v["state"]
  jax.block_until_ready(state)
  mon = tp.power_meter()
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = v["step"](state, v["batches"][i % 2])
  jax.block_until_ready((state, metrics))
  t1 = time.perf_counter()
  v["state"] = state
  v["loss_last"] = float(jax.device_get(metrics["loss"]))
  power = tp.power_of(mon, t0, t1, steps)
  for key in ("power_W", "energy_J_per_step"):
    if power.get(key):
      v[key].append(power[key])
  return (t1 - t0) / steps * 1e3


def profile_steps(v: dict, steps: int, top: int) -> dict:
  import jax  # noqa: PLC0415

  from efficientllm_jax.bench import profile  # noqa: PLC0415
  state = v["state"]
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i in range(steps):
        state, metrics = v["step"](state, v["batches"][i % 2])
      jax.block_until_ready((state, metrics))
    v["state"] = state
    return profile.summarize(profile.find_trace(d), steps, top=top)


def row(v: dict, base_ms: float) -> dict:
  mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
  med = statistics.median(v["ms"])
  t = v["cfg"].train
  return {"name": v["name"], "median_ms": med, "min_ms": min(v["ms"]), "rounds_ms": v["ms"],
          "vs_first": base_ms / med, "tokens_per_s": t.micro_batch * t.grad_accum * v["cfg"].data.seq_len / med * 1e3,
          "power_W": mean(v["power_W"]), "energy_J_per_step": mean(v["energy_J_per_step"]),
          "compile_s": v["compile_s"], "loss_first": v["loss_first"], "loss_last": v["loss_last"],
          **({"profile": v["profile"]} if "profile" in v else {})}


def print_table(rows: list[dict]) -> None:
  print("\n| variant | median ms | min ms | rounds (ms) | × first | W | J/step |")
  print("|---|---:|---:|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {' '.join(f'{x:.1f}' for x in r['rounds_ms'])}"
          f" | {r['vs_first']:.3f} | {tp.na(r['power_W'], '.0f')} | {tp.na(r['energy_J_per_step'], '.0f')} |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="configs/base.py:0.5B", help="shared config FILE:ARG")
  ap.add_argument("--set", action="append", default=[], help="key=value for every variant (repeatable)")
  ap.add_argument("--variant", action="append", default=[], help="one variant: 'k=v;k=v' ('' = the shared config)")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps after each compile step")
  ap.add_argument("--profile", type=int, default=0, help="then trace this many steps of each variant")
  ap.add_argument("--profile_top", type=int, default=12, help="heaviest kernels listed per profile")
  ap.add_argument("--json", default="", help="also write the rows here")
  args = ap.parse_args()
  variants = args.variant or [""]
  if len(set(variants)) != len(variants):
    raise SystemExit(f"--variant given twice: {variants}")
  if min(args.rounds, args.steps) < 1:
    raise SystemExit("--rounds and --steps must be >= 1")
  from efficientllm_jax import config as config_lib  # noqa: PLC0415
  for v in variants:  # every config checked before anything compiles
    try:
      config_lib.validate(tp.build_config(args.config, args.set, tp.parse_override(v)))
    except config_lib.ConfigError as e:
      raise SystemExit(f"--variant={v!r}: {e}") from None
  runs = [build_variant(args, v) for v in variants]
  for rnd in range(args.rounds):
    for v in runs if rnd % 2 == 0 else runs[::-1]:
      v["ms"].append(time_steps(v, args.steps))
    print(f"round {rnd}: " + "  ".join(f"{v['name']} {v['ms'][-1]:.1f} ms" for v in runs), flush=True)
  if args.profile:
    from efficientllm_jax.bench import profile  # noqa: PLC0415
    for v in runs:
      v["profile"] = profile_steps(v, args.profile, args.profile_top)
      print(f"\n{v['name']}\n{profile.format_summary(v['profile'])}")
  base = statistics.median(runs[0]["ms"])
  rows = [row(v, base) for v in runs]
  print_table(rows)
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
