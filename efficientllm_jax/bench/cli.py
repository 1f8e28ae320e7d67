"""Flags shared by launch.bench, launch.slurm and launch.xm_launch, and the --config.* pass-through.

`--config.a.b=v` on these commands is not a flag of theirs: it is lifted out of argv before absl parses it and
handed to every variant's `python -m launch` (after the sweep's own overrides, so it wins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import app, flags

from efficientllm_jax.bench import sweeps

DEFAULT_RESULTS = "results/efficientllm_benchmark"


def define_common_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the sweep-selection flags once per FlagValues (several launch modules may be imported together)."""
  if "scale" in fv:
    return
  flags.DEFINE_enum("scale", "paper", sweeps.SCALES, "paper: the study's sizes; smoke: tiny models for a CPU.",
                    flag_values=fv)
  flags.DEFINE_string("results_dir", DEFAULT_RESULTS, "Root of the per-variant workdirs and the tables.",
                      flag_values=fv)
  flags.DEFINE_integer("steps", None, "train.steps for every variant.", flag_values=fv)
  flags.DEFINE_integer("tokens", None, "Training tokens per variant: sets train.steps from each variant's "
                       "micro-batch x grad-accum x seq (wins over --steps and --config.train.steps).",
                       flag_values=fv)
  flags.DEFINE_list("only", [], "Run only these variant names (e.g. mqa_0.5B,gqa_0.5B).", flag_values=fv)
  flags.DEFINE_string("configs_root", "configs", "Folder holding attention/, positional/, moe/ config files.",
                      flag_values=fv)
  flags.DEFINE_bool("force", False, "Rerun variants that already have a summary.json (the old run is moved "
                    "into previous-<time>/ by launch --overwrite).", flag_values=fv)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Lifts --config.key=value out of argv; returns (the rest of argv, [(key, value)])."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq or not key:
        raise app.UsageError(f"{a}: write config overrides as --config.key=value (e.g. --config.train.steps=30)")
      overrides.append((key, value))
    elif a == "--config" or a.startswith("--config="):
      raise app.UsageError(f"{a}: the sweep picks each variant's config file; pass only --config.key=value "
                           "overrides")
    else:
      rest.append(a)
  return rest, overrides


def flags_parser(overrides_out: list, fv: flags.FlagValues = flags.FLAGS) -> Callable[[list[str]], list[str]]:
  """An app.run flags_parser that stores the lifted overrides in `overrides_out`."""

  def parse(argv: list[str]) -> list[str]:
    rest, overrides = split_overrides(argv[1:])
    overrides_out.extend(overrides)
    return fv([argv[0], *rest])

  return parse


def sweep_of(argv: Sequence[str], usage: str) -> str:
  """The one positional argument of a sweep launcher (attention | positional | moe | all), else a usage error."""
  if len(argv) != 2 or argv[1] not in (*sweeps.SWEEPS, "all"):
    raise app.UsageError(usage)
  return argv[1]


def variants_from_flags(sweep: str, overrides: Sequence[tuple[str, str]],
                        fv: flags.FlagValues = flags.FLAGS) -> list[sweeps.Variant]:
  """The sweep's variants with --steps, the pass-through overrides, --only and --tokens applied."""
  try:
    variants = sweeps.expand(sweep, fv.scale, steps=fv.steps, overrides=overrides, configs_root=fv.configs_root)
    variants = sweeps.select(variants, fv.only)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if fv.tokens:
    variants = sweeps.with_token_budget(variants, fv.tokens)
  return variants
