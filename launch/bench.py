"""The benchmark suite: python -m launch.bench {attention|positional|moe|all} [--scale=smoke] [--config.k=v ...]

Trains each variant of the sweep in its own `python -m launch` subprocess under
<results_dir>/{attention,positional_encoding,moe}_results/<variant>/, skipping variants that already have a summary.json (--force reruns),
then writes and prints the sweep's table (.txt/.md/.csv) and plots (.png) under <results_dir>.
`python -m launch.bench tables [sweep ...]` rebuilds tables and plots from existing workdirs (e.g. after slurm).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from efficientllm_jax.bench import cli, runner, sweeps, tables
from efficientllm_jax.data import corpus
from launch import lazy_flags

cli.define_common_flags()
flags.adopt_module_key_flags(cli)  # --helpshort lists the shared flags too
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each variant's launch command; run nothing.")
_STREAM = flags.DEFINE_bool("stream", False, "Echo each run's console output (always kept in its workdir's "
                            "bench_stdout.log).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 0.0, "Stop a variant after this many seconds (0 = no limit); it is "
                              "recorded as failed and the sweep goes on.")
_PLOTS = flags.DEFINE_bool("plots", True, "Write the PNG plots beside the tables.")
FLAGS = flags.FLAGS
USAGE = "usage: python -m launch.bench {attention|positional|moe|all} [flags] | python -m launch.bench tables [sweep ...]"
_JOBS = flags.DEFINE_integer("jobs", 1, "Variants run at a time (the first runs alone). >1 shortens a CPU smoke "
                             "sweep; the time-based figures then share the machine, and the tables say so.")

_OVERRIDES: list[tuple[str, str]] = []


def write_outputs(sweep: str, runs: list[tables.Run]) -> str:
  """Tables (and plots) for one sweep; returns the text table."""
  paths = tables.write_tables(sweep, runs, FLAGS.results_dir)
  if _PLOTS.value:
    from efficientllm_jax.bench import plots  # matplotlib only when plotting

    plots.write_plots(sweep, runs, FLAGS.results_dir)
  return paths["txt"].read_text()


def rebuild_tables(names: list[str]) -> int:
  scale = FLAGS.scale if FLAGS["scale"].present else None
  found = 0
  for sweep in names or list(sweeps.SWEEPS):
    runs = tables.discover(FLAGS.results_dir, sweep, scale=scale)
    if not runs:
      print(f"{sweep}: no workdirs under {FLAGS.results_dir}/{sweeps.SWEEPS[sweep].results_subdir}", flush=True)
      continue
    found += 1
    print(write_outputs(sweep, runs), flush=True)
  return 0 if found else 1


def main(argv):
  if len(argv) < 2:
    raise app.UsageError(USAGE)
  command, rest = argv[1], argv[2:]
  if command == "record_failure":  # used by the slurm script after a failed task
    if len(rest) != 2:
      raise app.UsageError("usage: python -m launch.bench record_failure WORKDIR RETURNCODE")
    workdir, rc = Path(rest[0]), int(rest[1])
    stderr = (workdir / runner.STDERR_LOG).read_text() if (workdir / runner.STDERR_LOG).exists() else ""
    runner.record_failure(workdir, rc, runner.failure_reason(stderr, rc), source="slurm")
    return
  if command == "tables":
    bad = [n for n in rest if n not in sweeps.SWEEPS]
    if bad:
      raise app.UsageError(f"unknown sweep {', '.join(bad)}: use {', '.join(sweeps.SWEEPS)}")
    sys.exit(rebuild_tables(rest))
  if rest:
    raise app.UsageError(f"unexpected arguments: {' '.join(rest)}\n{USAGE}")
  if command not in (*sweeps.SWEEPS, "all"):
    raise app.UsageError(f"unknown sweep {command!r}\n{USAGE}")

  variants = cli.variants_from_flags(command, _OVERRIDES)
  print(f"bench: {command} sweep, {FLAGS.scale} scale, {len(variants)} variants -> {FLAGS.results_dir}",
        flush=True)
  smoke = FLAGS.scale == "smoke" and variants
  env = sweeps.smoke_env(corpus.cache_dir(sweeps.load_config(variants[0]))) if smoke else None
  outcomes = runner.run_variants(variants, FLAGS.results_dir, force=FLAGS.force, timeout_s=_TIMEOUT.value or None,
                                 stream=_STREAM.value, dry_run=_DRY_RUN.value, env=env, jobs=_JOBS.value)
  if _DRY_RUN.value:
    return
  for sweep in dict.fromkeys(v.sweep for v in variants):
    runs = tables.discover(FLAGS.results_dir, sweep, scale=FLAGS.scale)
    print("\n" + write_outputs(sweep, runs), flush=True)
  print(f"tables and plots: {FLAGS.results_dir}/", flush=True)
  if any(o.status == "failed" for o in outcomes):
    sys.exit(1)


def _flags_parser(argv: list[str]) -> list[str]:
  """cli's parser; grain's flags are defined first when the command line may name one (launch/lazy_flags.py)."""
  rest, _ = cli.split_overrides(argv[1:])
  if lazy_flags.may_name_undefined_flag([argv[0], *rest]):
    from efficientllm_jax.data import pipeline  # noqa: F401 - grain defines its flags on import

  return cli.flags_parser(_OVERRIDES)(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
