"""The three EfficientLLM sweeps as lists of variants, at `paper` scale (the study's sizes) or `smoke` (tiny models
that train on a CPU in seconds).

A variant is one `python -m launch` run: a config file[:preset] plus --config.* overrides, trained in its own
workdir <results_dir>/<sweep's results folder>/<variant name>/. Overrides are kept as (key, string) pairs, exactly
what goes on the command line, so a command written into a slurm script parses back to the same config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root: config paths are relative to it
SCALES = ("paper", "smoke")


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  title: str
  results_subdir: str  # per-variant workdirs live here
  table_stem: str  # <stem>.txt / .md / .csv and the plots beside them


SWEEPS = {
    "attention": Sweep("attention", "Attention mechanisms", "attention_results", "attention_mechanisms_table"),
    "positional": Sweep("positional", "Positional encodings", "positional_encoding_results",
                        "positional_encoding_table"),
    "moe": Sweep("moe", "MoE vs dense", "moe_results", "moe_table"),
}

# EfficientLLM's attention sweep: every kind at three sizes, micro-batch shrinking with size.
ATTENTION_KINDS = (("mqa", "MQA"), ("gqa", "GQA"), ("mla", "MLA"), ("nsa", "NSA"))
ATTENTION_MICRO_BATCH = {"0.5B": 4, "1.5B": 2, "3B": 1}
# Positional sweep: 1.5B GQA at 8K context, one run per scheme (ALiBi added beside the paper's five).
POSITION_KINDS = (("rope", "RoPE"), ("sinusoidal", "Sinusoidal"), ("learned", "Learned absolute"),
                  ("relative", "Relative (T5 bias)"), ("none", "None (NoPE)"), ("alibi", "ALiBi"))
POSITION_SIZE, POSITION_SEQ, POSITION_MICRO_BATCH = "1.5B", 8192, 2
# MoE sweep: (config file, preset, label) at each scale.
MOE_VARIANTS = {
    "paper": (("dense", "1.5B", "Dense 1.5B"), ("dense", "3B", "Dense 3B"), ("moe", "0.5Bx8", "MoE 0.5Bx8"),
              ("moe", "1.5Bx8", "MoE 1.5Bx8")),
    "smoke": (("dense", "tiny", "Dense tiny"), ("moe", "tiny", "MoE tinyx8")),
}
# Smoke scale: the tiny preset, byte tokenizer, 128-token sequences, a couple of dozen steps: ~15 s a variant
# on a quiet CPU, most of it JAX start-up and compilation. No checkpoints (a smoke run is never resumed, and the
# final save costs a compile and an orbax write). Every key exists in configs/base.py.
SMOKE_OVERRIDES = (
    ("data.tokenizer", "bytes"), ("model.vocab_size", "512"), ("data.max_corpus_mb", "1.0"),
    ("data.seq_len", "128"), ("train.micro_batch", "4"), ("train.steps", "24"), ("train.warmup_steps", "4"),
    ("train.log_every", "4"), ("train.eval_every", "0"), ("train.eval_batches", "2"), ("checkpoint.every", "0"),
)
# Smoke variants share JAX's persistent compilation cache (under the data cache dir): variants whose programs are
# identical (GQA tiny = RoPE tiny = dense tiny; the init of every variant with the same parameters) compile once.
# Paper scale does not use it, so its compile_s is always a real compile.
COMPILE_CACHE_SUBDIR = "jax_compile"


def smoke_env(cache_root: str | Path) -> dict[str, str]:
  """Environment additions for smoke-scale subprocesses: the shared compilation cache (an explicit
  JAX_COMPILATION_CACHE_DIR in the caller's environment wins)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(Path(cache_root) / COMPILE_CACHE_SUBDIR),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@dataclasses.dataclass(frozen=True)
class Variant:
  sweep: str
  name: str  # workdir name, e.g. mla_1.5B
  label: str  # the table's method column, e.g. "MLA 1.5B"
  config: str  # config file[:preset], as `python -m launch --config=` takes it
  overrides: tuple[tuple[str, str], ...] = ()
  scale: str = "paper"

  def config_args(self) -> list[str]:
    """--config first (config_flags refuses overrides before it), then one --config.key=value per override."""
    return [f"--config={self.config}"] + [f"--config.{k}={v}" for k, v in self.overrides]

  def workdir(self, results_dir: str | Path) -> Path:
    return Path(results_dir) / SWEEPS[self.sweep].results_subdir / self.name

  def launch_args(self, results_dir: str | Path, *, overwrite: bool = True) -> list[str]:
    """Arguments of `python -m launch` for this variant."""
    return self.config_args() + [f"--workdir={self.workdir(results_dir)}"] + (["--overwrite"] if overwrite else [])

  def with_overrides(self, pairs: Iterable[tuple[str, str]]) -> Variant:
    return dataclasses.replace(self, overrides=merge_overrides(self.overrides, pairs))


def merge_overrides(*groups: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
  """Later groups win; a key appears once, at its first position (so commands stay short and readable)."""
  merged: dict[str, str] = {}
  for group in groups:
    for k, v in group:
      merged[k] = str(v)
  return tuple(merged.items())


def sweep_names(sweep: str) -> tuple[str, ...]:
  if sweep == "all":
    return tuple(SWEEPS)
  if sweep not in SWEEPS:
    raise ValueError(f"unknown sweep {sweep!r}: use one of {', '.join(SWEEPS)}, all")
  return (sweep,)


def _attention(scale: str, root: str) -> list[Variant]:
  sizes = {"tiny": None} if scale == "smoke" else ATTENTION_MICRO_BATCH
  out = []
  for size, micro_batch in sizes.items():  # size-major: small models first, as the paper's table reads
    for kind, label in ATTENTION_KINDS:
      extra = () if micro_batch is None else (("train.micro_batch", str(micro_batch)),)
      out.append(Variant("attention", f"{kind}_{size}", f"{label} {size}", f"{root}/attention/{kind}.py:{size}",
                         extra, scale))
  return out


def _positional(scale: str, root: str) -> list[Variant]:
  size = "tiny" if scale == "smoke" else POSITION_SIZE
  extra = () if scale == "smoke" else (("data.seq_len", str(POSITION_SEQ)),
                                       ("train.micro_batch", str(POSITION_MICRO_BATCH)))
  return [Variant("positional", f"{kind}_{size}", label, f"{root}/positional/{kind}.py:{size}", extra, scale)
          for kind, label in POSITION_KINDS]


def _moe(scale: str, root: str) -> list[Variant]:
  return [Variant("moe", f"{kind}_{preset}", label, f"{root}/moe/{kind}.py:{preset}", (), scale)
          for kind, preset, label in MOE_VARIANTS[scale]]


_BUILDERS = {"attention": _attention, "positional": _positional, "moe": _moe}


def expand(sweep: str, scale: str, *, steps: int | None = None, overrides: Sequence[tuple[str, str]] = (),
           configs_root: str = "configs") -> list[Variant]:
  """The variants of `sweep` (a name or 'all') at `scale`; `steps` and then `overrides` apply to every variant."""
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
  scale_overrides = SMOKE_OVERRIDES if scale == "smoke" else ()
  run_overrides = (("train.steps", str(steps)),) if steps else ()
  out = []
  for name in sweep_names(sweep):
    for v in _BUILDERS[name](scale, configs_root.rstrip("/")):
      out.append(dataclasses.replace(v, overrides=merge_overrides(v.overrides, scale_overrides, run_overrides,
                                                                  overrides)))
  return out


def select(variants: list[Variant], only: Sequence[str]) -> list[Variant]:
  """Keeps the variants named in `only` (sweep order kept); an unknown name is an error naming the known ones."""
  if not only:
    return variants
  known = {v.name for v in variants}
  unknown = [n for n in only if n not in known]
  if unknown:
    raise ValueError(f"--only names unknown variant(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
  return [v for v in variants if v.name in set(only)]


# ---- configs ------------------------------------------------------------------------------------------------

def parse_launch_args(args: Sequence[str]):
  """Parses `python -m launch` arguments exactly as launch does: returns (config, workdir, overwrite)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["launch", *_rooted(args)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file[:preset]", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "move an earlier run aside", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir, fv.overwrite


def _rooted(args: Sequence[str]) -> list[str]:
  """A relative --config path that is not there from the current directory is taken from the repo root."""
  out = []
  for a in args:
    if a.startswith("--config="):
      path, sep, preset = a[len("--config="):].partition(":")
      if not Path(path).is_absolute() and not Path(path).exists() and (ROOT / path).exists():
        a = f"--config={ROOT / path}{sep}{preset}"
    out.append(a)
  return out


def load_config(variant: Variant):
  """The variant's config as `python -m launch` would build it (config file, then overrides)."""
  return parse_launch_args(variant.config_args())[0]


def tokens_per_step(cfg) -> int:
  return int(cfg.train.micro_batch) * int(cfg.train.grad_accum) * int(cfg.data.seq_len)


def per_device_batches(variants: list[Variant], devices: int) -> list[Variant]:
  """Weak scaling for a job of `devices` GPUs: each variant's train.micro_batch (the study's per-GPU figure,
  4 / 2 / 1) times the device count, so every GPU keeps the micro-batch it has on one GPU."""
  if devices == 1:
    return list(variants)
  return [v.with_overrides([("train.micro_batch", str(int(load_config(v).train.micro_batch) * devices))])
          for v in variants]


def with_token_budget(variants: list[Variant], tokens: int) -> list[Variant]:
  """Sets each variant's train.steps so it trains on at least `tokens` tokens (its own batch and sequence)."""
  out = []
  for v in variants:
    steps = max(1, math.ceil(tokens / tokens_per_step(load_config(v))))
    out.append(v.with_overrides([("train.steps", str(steps))]))
  return out
