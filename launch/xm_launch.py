"""XManager: python -m launch.xm_launch attention --scale=paper [--gpus=0,1,2,3] [--config.key=value ...]

One XManager work unit per sweep variant, each `python -m launch ...` run as a local binary on this machine with
the xm_local.Local executor. Without --gpus the work units run one after another (each sees every GPU, like the
local runner); with --gpus=0,1,... they run in waves of that many, each pinned to one GPU by
CUDA_VISIBLE_DEVICES. Variants with a summary.json are left out unless --force. Afterwards the tables are built as
`python -m launch.bench tables` builds them.

xmanager is an optional extra (pip install -e '.[xm]'); it is imported only when launching, so `work_units`
(the job list) works and is tested without it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from efficientllm_jax.bench import cli, runner
from efficientllm_jax.bench.sweeps import Variant

cli.define_common_flags()
flags.adopt_module_key_flags(cli)  # --helpshort lists the shared flags too
_GPUS = flags.DEFINE_list("gpus", [], "GPU ids to spread work units over, one unit per GPU at a time (empty: "
                          "one unit at a time, every GPU visible).")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default efficientllm-<sweep>-<scale>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the work units; launch nothing (no xmanager needed).")
FLAGS = flags.FLAGS

_OVERRIDES: list[tuple[str, str]] = []


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  name: str
  args: tuple[str, ...]  # after the Python interpreter: -m launch --config=... --workdir=... --overwrite
  env: tuple[tuple[str, str], ...]  # CUDA_VISIBLE_DEVICES when pinned
  wave: int  # work units of one wave run together; waves run one after another
  variant: Variant


def work_units(variants: Sequence[Variant], results_dir: str | Path, *, gpus: Sequence[str] = ()) -> list[WorkUnit]:
  """One work unit per variant, in sweep order; with `gpus`, round-robin over them in waves of len(gpus)."""
  slots = len(gpus) or 1
  units = []
  for i, v in enumerate(variants):
    env = (("CUDA_VISIBLE_DEVICES", str(gpus[i % slots])),) if gpus else ()
    units.append(WorkUnit(name=re.sub(r"[^A-Za-z0-9_-]", "-", f"{v.sweep}-{v.name}"),
                          args=("-m", "launch", *v.launch_args(results_dir, overwrite=True)), env=env,
                          wave=i // slots, variant=v))
  return units


def launch(units: Sequence[WorkUnit], title: str, results_dir: str | Path) -> list[str]:
  """Runs the work units through xm_local; returns the names of those that failed (recorded for the tables)."""
  import asyncio

  try:
    from xmanager import xm, xm_local
  except ImportError:
    raise SystemExit("error: xmanager is not installed: pip install -e '.[xm]' (or use python -m launch.bench)")

  failed: list[str] = []

  async def run() -> None:
    async with xm_local.create_experiment(experiment_title=title) as experiment:
      [executable] = experiment.package([xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable)])
      for wave in sorted({u.wave for u in units}):
        members = [u for u in units if u.wave == wave]
        added = []
        for u in members:
          job = xm.Job(executable=executable, executor=xm_local.Local(), name=u.name, args=list(u.args),
                       env_vars=dict(u.env))
          added.append(await experiment.add(job))
        for u, wu in zip(members, added):
          try:
            await wu.wait_until_complete()
          except xm.WorkUnitError as e:
            failed.append(u.name)
            runner.record_failure(u.variant.workdir(results_dir), None, f"xmanager work unit failed: {e}")
            print(f"{u.name}: work unit failed: {e}", flush=True)

  asyncio.run(run())
  return failed


def main(argv):
  sweep = cli.sweep_of(argv, "usage: python -m launch.xm_launch {attention|positional|moe|all} [--gpus=0,1] "
                             "[--config.key=value ...]")
  variants = cli.variants_from_flags(sweep, _OVERRIDES)
  todo = [v for v in variants if FLAGS.force or not runner.summary_done(v.workdir(FLAGS.results_dir))]
  for v in variants:
    if v not in todo:
      print(f"{v.sweep}/{v.name}: skipped, summary.json exists (--force reruns it)")
  units = work_units(todo, FLAGS.results_dir, gpus=_GPUS.value)
  for u in units:
    env = " ".join(f"{k}={val}" for k, val in u.env)
    print(f"wave {u.wave}: {u.name}: {env + ' ' if env else ''}python {' '.join(u.args)}", flush=True)
  if _DRY_RUN.value or not units:
    return
  failed = launch(units, _TITLE.value or f"efficientllm-{sweep}-{FLAGS.scale}", FLAGS.results_dir)
  for name in dict.fromkeys(v.sweep for v in variants):
    from efficientllm_jax.bench import tables

    runs = tables.discover(FLAGS.results_dir, name, scale=FLAGS.scale)
    print(tables.write_tables(name, runs, FLAGS.results_dir)["txt"].read_text(), flush=True)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(_OVERRIDES))
