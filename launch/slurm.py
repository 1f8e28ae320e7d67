"""A slurm job array for a sweep: python -m launch.slurm attention --scale=paper --partition=P --gpus=N [...]

Writes an sbatch script (array index -> variant, `srun python -m launch ...` with one task per GPU) to --script
(default <results_dir>/slurm/<sweep>_<scale>.sbatch) and prints it; --submit hands it to sbatch. After the array
finishes, `python -m launch.bench tables` builds the tables from the workdirs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from efficientllm_jax.bench import cli, sweeps
from efficientllm_jax.bench.slurm import SlurmOptions, log_dir_of, make_script

cli.define_common_flags()
flags.adopt_module_key_flags(cli)  # --helpshort lists the shared flags too
_PARTITION = flags.DEFINE_string("partition", None, "Slurm partition.")
_GPUS = flags.DEFINE_integer("gpus", 1, "GPUs per node for each variant (one launch process per GPU).")
_NODES = flags.DEFINE_integer("nodes", 1, "Nodes per variant.")
_TIME = flags.DEFINE_string("time", "04:00:00", "Wall-clock limit per array task.")
_CPUS = flags.DEFINE_integer("cpus_per_gpu", 8, "CPU cores per task (= per GPU).")
_MEM = flags.DEFINE_string("mem", "", "Memory per node, e.g. 200G (empty: the partition's default).")
_ACCOUNT = flags.DEFINE_string("account", "", "Slurm account.")
_QOS = flags.DEFINE_string("qos", "", "Slurm QoS.")
_CONSTRAINT = flags.DEFINE_string("constraint", "", "Node feature constraint, e.g. h100.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 0, "At most this many array tasks at once (0: no limit).")
_PYTHON = flags.DEFINE_string("python", "python", "Python interpreter on the compute nodes.")
_SETUP = flags.DEFINE_multi_string("setup", [], "Shell line run before each task, e.g. "
                                   "--setup='source .venv/bin/activate' (repeatable).")
_SCRIPT = flags.DEFINE_string("script", None, "Where to write the script (default "
                              "<results_dir>/slurm/<sweep>_<scale>.sbatch).")
_SUBMIT = flags.DEFINE_bool("submit", False, "Submit with sbatch after writing.")
_PER_DEVICE = flags.DEFINE_bool("per_device_batch", True, "Treat each variant's train.micro_batch as per GPU (the "
                                "study's 4 / 2 / 1) and multiply it by gpus x nodes; --noper_device_batch keeps it "
                                "as the global micro-batch.")
flags.mark_flag_as_required("partition")
FLAGS = flags.FLAGS

_OVERRIDES: list[tuple[str, str]] = []


def main(argv):
  sweep = cli.sweep_of(argv, "usage: python -m launch.slurm {attention|positional|moe|all} --partition=P [--gpus=N] "
                             "[--config.key=value ...]")
  variants = cli.variants_from_flags(sweep, _OVERRIDES)
  if _PER_DEVICE.value:
    variants = sweeps.per_device_batches(variants, _GPUS.value * _NODES.value)
  options = SlurmOptions(partition=_PARTITION.value, gpus=_GPUS.value, nodes=_NODES.value, time=_TIME.value,
                         cpus_per_gpu=_CPUS.value, mem=_MEM.value, account=_ACCOUNT.value, qos=_QOS.value,
                         constraint=_CONSTRAINT.value, max_parallel=_MAX_PARALLEL.value,
                         job_name=f"efficientllm-{sweep}", python=_PYTHON.value, setup=tuple(_SETUP.value),
                         force=FLAGS.force)
  text = make_script(variants, FLAGS.results_dir, options, title=f"EfficientLLM {sweep} sweep, {FLAGS.scale} scale")
  path = Path(_SCRIPT.value or Path(FLAGS.results_dir) / "slurm" / f"{sweep}_{FLAGS.scale}.sbatch")
  path.parent.mkdir(parents=True, exist_ok=True)
  log_dir_of(FLAGS.results_dir, options).mkdir(parents=True, exist_ok=True)  # slurm opens the logs before the job
  path.write_text(text)
  path.chmod(0o755)
  print(text)
  print(f"# written to {path} ({len(variants)} array tasks)", flush=True)
  if _SUBMIT.value:
    if not shutil.which("sbatch"):
      print("error: sbatch is not on PATH: submit from a slurm login node, or drop --submit", file=sys.stderr)
      sys.exit(2)
    sys.exit(subprocess.run(["sbatch", str(path)]).returncode)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(_OVERRIDES))
