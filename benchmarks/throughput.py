"""Training throughput, ours vs the PyTorch peer (issue 11): tokens/s, MFU and peak memory side by side.

  python benchmarks/throughput.py --config=configs/base.py:1.5B \\
      --override="model.remat=full" --override="model.remat=dots;model.param_dtype=bfloat16"
  python benchmarks/throughput.py --config=configs/base.py:0.5B --set=model.ffn_dim=9728 --peer=0 \\
      --override="" --override="config=configs/moe/moe.py:0.5Bx8;moe.impl=pallas"
  python benchmarks/throughput.py --config=configs/base.py:tiny --set=train.micro_batch=2 --peer=0 --steps=2  # CPU

Ours: efficientllm_jax.train.step.build(config) and its jitted train step (donated state) on random token ids
(uniform over the vocabulary, two alternating device-resident batches of [grad_accum, micro_batch, seq]), one
compile step, --warmup steps, then --steps timed steps ended by block_until_ready: mean wall time per step.
Peer: transformers' Qwen2ForCausalLM with the same dimensions (random init, bf16 weights, attn_implementation=
'sdpa', labels = inputs so the loss is HF's own shifted cross-entropy over full logits), torch.optim.AdamW(fused=
True) with the same lr / betas / weight decay, gradient clipping at train.clip_norm, the same micro-batch x seq
per step; timed the same way with torch.cuda.synchronize before reading clocks. If it runs out of memory,
--peer_ckpt=auto retries with transformers' gradient checkpointing (and says so). torch and transformers are
imported only in the peer's process; without them the peer is skipped with a message.

Every run (each --override set of ours, then the peer) is its own subprocess: memory is freed between runs and
each peak is its own (ours: the device allocator's peak_bytes_in_use; peer: torch.cuda.max_memory_allocated).
Over the timed steps both also report the GPU's mean board power (W) and energy per step (J/step), through
metrics.monitor.DeviceMonitor (NVML; n/a without it). MFU for both is
efficientllm_jax.metrics.flops.training_flops_per_step of the same config (model FLOPs, remat not counted) over the
device's bf16 peak.

--set=key=value (repeatable) changes the shared config (ours and the peer's shapes). --override (repeatable) is
one set of ours only: items separated by ';', each key=value; `config=FILE:ARG` starts that set from another
config file (then --set applies on top), `xla=FLAGS` sets XLA_FLAGS for that run. No --override: one run of the
shared config.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = "THROUGHPUT_RESULT "


# ----- config handling (no jax import needed) -----

def load_config(spec: str):
  """`configs/x.py:ARG` -> get_config(ARG)."""
  path, _, arg = spec.partition(":")
  file = Path(path) if Path(path).is_absolute() else ROOT / path
  mod_spec = importlib.util.spec_from_file_location(f"cfg_{file.stem}", file)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def parse_value(text: str):
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def set_key(cfg, key: str, value) -> None:
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise SystemExit(f"unknown config key {key!r}")
  node[leaf] = value


def parse_override(text: str) -> dict[str, str]:
  items = {}
  for item in filter(None, (s.strip() for s in text.split(";"))):
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--override item {item!r} must be key=value")
    items[key.strip()] = value
  return items


def build_config(base_spec: str, sets: list[str], override: dict[str, str]):
  cfg = load_config(override.get("config", base_spec))
  for item in sets:
    key, _, value = item.partition("=")
    set_key(cfg, key.strip(), parse_value(value))
  for key, value in override.items():
    if key not in ("config", "xla"):
      set_key(cfg, key, parse_value(value))
  return cfg


def flops_and_peak(cfg, device_kind: str):
  from efficientllm_jax.metrics import flops  # noqa: PLC0415 - numpy only
  peak, _ = flops.peak_flops_per_device(device_kind, float(cfg.metrics.peak_flops))
  return flops.training_flops_per_step(cfg), peak


def report(name: str, cfg, step_s: float, peak_bytes: float | None, device_kind: str, **extra) -> dict:
  t = cfg.train
  tokens = t.micro_batch * t.grad_accum * cfg.data.seq_len
  step_flops, peak = flops_and_peak(cfg, device_kind)
  return {"name": name, "step_s": step_s, "tokens_per_s": tokens / step_s,
          "mfu": step_flops / step_s / peak if peak else None,
          "peak_memory_GB": peak_bytes / 1e9 if peak_bytes else None,
          "device": device_kind, "tokens_per_step": tokens, "flops_per_step": step_flops, **extra}


class _TorchGPU:
  """A torch CUDA device in the shape metrics.monitor.DeviceMonitor reads (platform, PCI bus id; no allocator
  stats), so the peer's power is sampled the same way as ours."""
  platform = "gpu"

  def __init__(self, torch, index: int = 0):
    p = torch.cuda.get_device_properties(index)
    self.device_kind = p.name
    self.local_hardware_id = index
    self.pci_bus_id = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"

  def memory_stats(self):
    return None


def power_meter(devices=lambda: None):
  """A started DeviceMonitor of `devices()` (None: JAX's) sampling every 0.1 s (NVML board power and energy
  counter), or None without NVML (CPU, no nvidia-ml-py) or on any error: power and energy then read n/a."""
  from efficientllm_jax.metrics.monitor import DeviceMonitor  # noqa: PLC0415
  try:
    mon = DeviceMonitor(devices(), interval_s=0.1)
  except Exception:  # information only: never fail a timing run on it
    return None
  if mon.reasons["power_W"]:
    mon.stop()
    return None
  return mon.start()


def power_of(mon, t0: float, t1: float, steps: int) -> dict:
  """Mean board power (W) and energy per step (J, from NVML's energy counter) of device 0 between t0 and t1.
  On a power-capped card (an H200 runs its 700 W cap in our steps, the SM clock dropping from 1980 to ~1600 MHz)
  a step's speed depends on its energy, so these say why two runs differ."""
  if mon is None:
    return {}
  mon.read()  # one sample at the end of the window (the monitor started just before it)
  rs = mon.readings()
  mon.stop()
  watts = [r.values["power_W"][0] for r in rs if r.values["power_W"][0] is not None]
  joules = [(r.t, r.values["energy_J"][0]) for r in rs if r.values["energy_J"][0] is not None]
  out = {"power_W": sum(watts) / len(watts) if watts else None, "power_limit_W": mon.power_limit_W[0]}
  if len(joules) >= 2 and joules[-1][0] > joules[0][0]:  # the counter's mean power times the step time
    out["energy_J_per_step"] = (joules[-1][1] - joules[0][1]) / (joules[-1][0] - joules[0][0]) * (t1 - t0) / steps
  return out


# ----- ours -----

def random_batches(cfg, built, n: int = 2) -> list:
  """n batches of random token ids [grad_accum, micro_batch, seq] (uniform over the vocabulary, never all zeros),
  placed on the devices as the train step takes them, like a prefetched batch."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from efficientllm_jax.train import step as step_lib  # noqa: PLC0415
  shape = (cfg.train.grad_accum, cfg.train.micro_batch, cfg.data.seq_len + 1)
  sharding = step_lib.batch_sharding(cfg, built.mesh)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
    out.append(jax.device_put({"inputs": ids[..., :-1], "targets": ids[..., 1:]}, sharding))
  return out


def na(x, spec: str) -> str:
  """x formatted by spec, or n/a when it is missing (None or 0)."""
  return format(x, spec) if x else "n/a"


def run_ours(cfg, name: str, steps: int, warmup: int, profile_steps: int = 0, profile_dir: str = "",
             profile_top: int = 12) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from efficientllm_jax import config as config_lib  # noqa: PLC0415
  from efficientllm_jax.train import step as step_lib  # noqa: PLC0415
  config_lib.validate(cfg)
  t0 = time.perf_counter()
  built = step_lib.build(cfg)
  batches = random_batches(cfg, built)
  state = built.state
  state, metrics = built.train_step(state, batches[0])
  first_loss = float(jax.device_get(metrics["loss"]))
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, metrics = built.train_step(state, batches[(i + 1) % 2])
  jax.block_until_ready((state, metrics))
  mon = power_meter()
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = built.train_step(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  t1 = time.perf_counter()
  step_s = (t1 - t0) / steps
  power = power_of(mon, t0, t1, steps)
  last_loss = float(jax.device_get(metrics["loss"]))
  if not (np.isfinite(first_loss) and np.isfinite(last_loss)):
    raise SystemExit(f"non-finite loss: first {first_loss}, last {last_loss}")
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  extra = {}
  if profile_steps:  # after the timed steps, so tracing costs the timing nothing
    import contextlib  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from efficientllm_jax.bench import profile  # noqa: PLC0415
    with (contextlib.nullcontext(profile_dir) if profile_dir else tempfile.TemporaryDirectory()) as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for i in range(profile_steps):
          state, metrics = built.train_step(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
      extra["profile"] = profile.summarize(profile.find_trace(d), profile_steps, top=profile_top)
  return report(name, cfg, step_s, stats.get("peak_bytes_in_use"), dev.device_kind, compile_s=compile_s,
                loss_first=first_loss, loss_last=last_loss, **power, **extra)


# ----- the PyTorch peer -----

def qwen2_config(cfg, transformers):
  import inspect  # noqa: PLC0415
  m = cfg.model
  if m.hidden != m.num_heads * m.head_dim:
    raise SystemExit(f"Qwen2Config derives head_dim = hidden / heads; model.head_dim={m.head_dim} differs")
  theta = float(cfg.position.rope_theta)
  rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": theta}}  # transformers >= 5
          if "rope_parameters" in inspect.signature(transformers.Qwen2Config.__init__).parameters
          else {"rope_theta": theta})
  return transformers.Qwen2Config(
      vocab_size=m.vocab_size, hidden_size=m.hidden, intermediate_size=m.ffn_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, rms_norm_eps=m.rms_eps,
      max_position_embeddings=max(cfg.data.seq_len, 32768), tie_word_embeddings=bool(m.tie_embeddings),
      use_sliding_window=False, hidden_act="silu", use_cache=False, attn_implementation="sdpa", **rope)


def run_peer(cfg, steps: int, warmup: int, ckpt: str) -> dict:
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError as e:
    return {"name": "peer", "skipped": f"torch/transformers not importable ({e})"}
  if not torch.cuda.is_available():
    return {"name": "peer", "skipped": "torch sees no CUDA device"}
  if cfg.ffn.kind != "dense" or cfg.attention.kind not in ("mha", "gqa", "mqa") or cfg.position.kind != "rope":
    return {"name": "peer", "skipped": "the peer is Qwen2 (dense SwiGLU, GQA, RoPE); this config is not"}
  t = cfg.train
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  gen = torch.Generator(device="cuda").manual_seed(0)
  batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch * t.grad_accum, cfg.data.seq_len),
                           device="cuda", generator=gen) for _ in range(2)]

  def attempt(checkpointing: bool) -> dict:
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # weights created in bf16 directly on the GPU
    with torch.device("cuda"):
      model = transformers.Qwen2ForCausalLM(qwen2_config(cfg, transformers))
    torch.set_default_dtype(torch.float32)
    model = model.to(device="cuda", dtype=torch.bfloat16).train()
    if checkpointing:
      model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                            weight_decay=t.weight_decay, fused=True)

    def step(ids):
      for mb in ids.split(t.micro_batch):  # gradient accumulation over micro-batches
        loss = model(input_ids=mb, labels=mb).loss / t.grad_accum
        loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss

    try:
      first = float(step(batches[0]))
      for i in range(warmup):
        step(batches[(i + 1) % 2])
      torch.cuda.synchronize()
      setup_s = time.perf_counter() - t0
      mon = power_meter(lambda: [_TorchGPU(torch)])
      t0 = time.perf_counter()
      for i in range(steps):
        loss = step(batches[i % 2])
      torch.cuda.synchronize()
      t1 = time.perf_counter()
      step_s = (t1 - t0) / steps
      return {"step_s": step_s, "loss_first": first * t.grad_accum, "loss_last": float(loss) * t.grad_accum,
              "setup_s": setup_s, "peak": torch.cuda.max_memory_allocated(), "power": power_of(mon, t0, t1, steps)}
    finally:
      del model, opt
      torch.cuda.empty_cache()

  label = f"peer transformers {transformers.__version__} sdpa bf16"
  used, r = ckpt == "on", None
  try:
    r = attempt(used)
  except torch.OutOfMemoryError:
    if ckpt != "auto" or used:
      return {"name": label, "skipped": "out of memory (try --peer_ckpt=auto or on)"}
  if r is None:  # retried outside the except block, so the failed attempt's frames (and tensors) are gone
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    used = True
    r = attempt(True)
  name = label + (" +grad-ckpt" if used else "")
  return report(name, cfg, r["step_s"], r["peak"], torch.cuda.get_device_name(), torch=torch.__version__,
                grad_checkpointing=used, loss_first=r["loss_first"], loss_last=r["loss_last"], setup_s=r["setup_s"],
                **r["power"])


# ----- driver -----

def worker(args) -> None:
  override = parse_override(args.override[0]) if args.override else {}
  cfg = build_config(args.config, args.set, override)
  if args.worker == "ours":
    label = ";".join(f"{k}={v}" for k, v in override.items() if k != "xla") or "(shared config)"
    if "xla" in override:
      label += f" XLA_FLAGS+={override['xla']}"
    row = run_ours(cfg, "ours " + label, args.steps, args.warmup, args.profile, args.profile_dir, args.profile_top)
  else:
    row = run_peer(cfg, args.steps, args.warmup, args.peer_ckpt)
  print(RESULT + json.dumps(row), flush=True)


def spawn(args, kind: str, override: str | None, index: int = 0) -> dict:
  cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={kind}", f"--config={args.config}",
         f"--steps={args.steps}", f"--warmup={args.warmup}", f"--peer_ckpt={args.peer_ckpt}",
         f"--profile={args.profile}", f"--profile_top={args.profile_top}"]
  if args.profile_dir and kind == "ours":  # one trace folder per run of ours: DIR/run0, DIR/run1, ...
    cmd.append(f"--profile_dir={Path(args.profile_dir) / f'run{index}'}")
  cmd += [f"--set={s}" for s in args.set]
  env = dict(os.environ)
  if override is not None:
    cmd.append(f"--override={override}")
    xla = parse_override(override).get("xla")
    if xla:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla).strip()
  name = f"{kind} {override or ''}".strip()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {"name": name, "skipped": f"timed out after {args.timeout_s} s"}
  for line in p.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]
  return {"name": name, "skipped": f"exit {p.returncode}: {' | '.join(tail)[-400:]}"}


def print_table(rows: list[dict]) -> None:
  peer = next((r for r in rows if r["name"].startswith("peer") and "skipped" not in r), None)
  print(f"\n{'run':<64}{'tokens/s':>11}{'step ms':>10}{'MFU %':>8}{'peak GB':>9}{'vs peer':>9}{'W':>6}{'J/step':>8}")
  for r in rows:
    if "skipped" in r:
      print(f"{r['name']:<64} skipped: {r['skipped']}")
      continue
    mfu = na(r.get("mfu") and r["mfu"] * 100, ".1f")
    ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
    print(f"{r['name'][:63]:<64}{r['tokens_per_s']:>11,.0f}{r['step_s'] * 1e3:>10.1f}{mfu:>8}"
          f"{na(r.get('peak_memory_GB'), '.1f'):>9}{ratio:>9}{na(r.get('power_W'), '.0f'):>6}"
          f"{na(r.get('energy_J_per_step'), '.0f'):>8}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="configs/base.py:1.5B", help="shared config FILE:ARG")
  ap.add_argument("--set", action="append", default=[], help="key=value for the shared config (repeatable)")
  ap.add_argument("--override", action="append", default=[], help="one set of ours: 'k=v;k=v' (repeatable)")
  ap.add_argument("--peer", type=int, default=1, help="1: also run the transformers peer; 0: skip it")
  ap.add_argument("--peer_ckpt", default="auto", choices=("off", "on", "auto"),
                  help="peer gradient checkpointing; auto = only after an out-of-memory")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile step")
  ap.add_argument("--timeout_s", type=int, default=300, help="per run")
  ap.add_argument("--profile", type=int, default=0,
                  help="ours: trace this many extra steps with jax.profiler and print the device-time breakdown")
  ap.add_argument("--profile_dir", default="",
                  help="keep each run's trace (perfetto_trace.json.gz, TensorBoard's profile plugin) in DIR/runN")
  ap.add_argument("--profile_top", type=int, default=12, help="heaviest kernels listed per profile")
  ap.add_argument("--json", default="", help="also write the rows here")
  ap.add_argument("--worker", default="", choices=("", "ours", "peer"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    return worker(args)
  rows = []
  for index, override in enumerate(args.override or [None]):
    rows.append(spawn(args, "ours", override, index))
    print(json.dumps(rows[-1]), flush=True)
  if args.peer:
    rows.append(spawn(args, "peer", None))
    print(json.dumps(rows[-1]), flush=True)
  print_table(rows)
  from efficientllm_jax.bench import profile  # noqa: PLC0415 - numpy-free
  for r in rows:
    if "profile" in r:
      print(f"\n{r['name']}\n{profile.format_summary(r['profile'])}")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
