"""An sbatch job-array script for a sweep: array index i runs variant i with `srun python -m launch ...`.

Each array task asks for `gpus` GPUs per node on `nodes` nodes and starts one launch process per GPU (srun
--ntasks-per-node=gpus); JAX's distributed runtime reads the slurm environment to join them into one run. Like
the local runner, a task whose workdir already has a summary.json exits at once unless FORCE=1 is exported, it
writes bench_variant.json (so `python -m launch.bench tables` labels its row), and a failed run leaves
bench_failure.json with the last error line of its stderr.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from efficientllm_jax.bench import runner
from efficientllm_jax.bench.sweeps import ROOT, Variant


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  partition: str
  gpus: int = 1  # GPUs per node, one launch process each
  nodes: int = 1
  time: str = "04:00:00"
  cpus_per_gpu: int = 8
  mem: str = ""  # e.g. 200G; "" leaves the partition default
  account: str = ""
  qos: str = ""
  constraint: str = ""
  max_parallel: int = 0  # array throttle (%N); 0 = slurm decides
  job_name: str = "efficientllm"
  python: str = "python"
  setup: tuple[str, ...] = ()  # shell lines run before the task, e.g. "source .venv/bin/activate"
  repo: str = str(ROOT)
  force: bool = False  # rerun variants that have a summary.json (FORCE=0/1 in the environment overrides it)


def log_dir_of(results_dir: str | Path, o: SlurmOptions) -> Path:
  """Where the array tasks' logs go: absolute, since sbatch opens it from the submitting directory."""
  return Path(o.repo) / results_dir / "slurm"


def _sbatch_lines(n: int, o: SlurmOptions, log_dir: Path) -> list[str]:
  array = f"0-{n - 1}" + (f"%{o.max_parallel}" if o.max_parallel else "")
  lines = [f"--job-name={o.job_name}", f"--partition={o.partition}", f"--array={array}", f"--nodes={o.nodes}",
           f"--ntasks-per-node={o.gpus}", f"--gpus-per-node={o.gpus}", f"--cpus-per-task={o.cpus_per_gpu}",
           f"--time={o.time}", f"--output={log_dir}/%x-%A_%a.out"]
  lines += [f"--{k}={v}" for k, v in (("mem", o.mem), ("account", o.account), ("qos", o.qos),
                                      ("constraint", o.constraint)) if v]
  return [f"#SBATCH {l}" for l in lines]


def _case(i: int, v: Variant, results_dir: str) -> list[str]:
  meta = {**dataclasses.asdict(v), "command": ["python", "-m", "launch", *v.launch_args(results_dir)]}
  args = " ".join(shlex.quote(a) for a in v.config_args())
  return [f"  {i})",
          f"    NAME={shlex.quote(v.sweep + '/' + v.name)}",
          f"    WORKDIR={shlex.quote(str(v.workdir(results_dir)))}",
          f"    META={shlex.quote(json.dumps(meta))}",
          f"    ARGS=({args})",
          "    ;;"]


def make_script(variants: Sequence[Variant], results_dir: str, options: SlurmOptions, *, title: str) -> str:
  """The sbatch script text for `variants` (array index = position in the list)."""
  if not variants:
    raise ValueError("no variants to submit")
  o = options
  log_dir = log_dir_of(results_dir, o)
  py = shlex.quote(o.python)
  out = ["#!/bin/bash", f"# {title}: {len(variants)} variants, one per array index "
         "(written by python -m launch.slurm).", *_sbatch_lines(len(variants), o, log_dir), "",
         "set -euo pipefail", f"cd {shlex.quote(o.repo)}", *o.setup,
         f"mkdir -p {shlex.quote(str(log_dir))}", "",
         'case "${SLURM_ARRAY_TASK_ID:?run this script with sbatch (it is a job array)}" in']
  for i, v in enumerate(variants):
    out += _case(i, v, results_dir)
  out += ['  *) echo "no variant for array index ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac", "",
          f'if [[ -f "$WORKDIR/summary.json" && "${{FORCE:-{int(o.force)}}}" != 1 ]]; then',
          '  echo "$NAME: $WORKDIR/summary.json exists, skipping (export FORCE=1 to rerun)"; exit 0',
          "fi",
          'mkdir -p "$WORKDIR"',
          f'rm -f "$WORKDIR/{runner.FAILURE_FILE}"',
          f'printf \'%s\\n\' "$META" > "$WORKDIR/{runner.VARIANT_FILE}"',
          f'echo "$NAME on $(hostname): {o.nodes} node(s) x {o.gpus} GPU(s)"',
          "set +e",
          f'srun --nodes={o.nodes} --ntasks-per-node={o.gpus} {py} -m launch "${{ARGS[@]}}" '
          f'--workdir="$WORKDIR" --overwrite 2> "$WORKDIR/{runner.STDERR_LOG}"',
          "rc=$?",
          "set -e",
          f'cat "$WORKDIR/{runner.STDERR_LOG}" >&2  # into the job log too',
          'if [[ $rc -ne 0 ]]; then',
          f'  {py} -m launch.bench record_failure "$WORKDIR" "$rc" || true',
          "fi",
          'exit "$rc"', ""]
  return "\n".join(out)
