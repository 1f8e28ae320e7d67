"""The slurm array script (run by bash with a stand-in srun: array range, per-index command parsed back to its
config, skip / FORCE, failure record), the XManager job list (no xmanager needed), and the CLIs' argument rules."""

import json
import os
import subprocess
import sys

import pytest

from efficientllm_jax.bench import runner, sweeps
from efficientllm_jax.bench.slurm import SlurmOptions, make_script
from tests.conftest import ROOT
from tests.test_bench_sweeps import ATTENTION_PAPER

FAKE_SRUN = """#!/bin/bash
# stand-in srun: records its arguments (NUL-separated) and exits with $FAKE_RC, writing $FAKE_ERR to stderr
printf '%s\\0' "$@" > "$SRUN_ARGS"
[ -n "${FAKE_ERR:-}" ] && echo "$FAKE_ERR" >&2
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fakebin(tmp_path):
  d = tmp_path / "bin"
  d.mkdir()
  (d / "srun").write_text(FAKE_SRUN)
  (d / "srun").chmod(0o755)
  return d


def _run_task(script, index, fakebin, tmp_path, **env):
  args_file = tmp_path / f"srun_args_{index}"
  e = {**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(index),
       "SRUN_ARGS": str(args_file), **env}
  r = subprocess.run(["bash", str(script)], env=e, capture_output=True, text=True, timeout=120)
  srun = args_file.read_bytes().decode().split("\0")[:-1] if args_file.exists() else None
  return r, srun


def _launch_args(srun_args):
  """The arguments after `python -m launch` in an srun command line."""
  i = srun_args.index("-m")
  assert srun_args[i + 1] == "launch"
  return srun_args[i + 2:]


def test_attention_paper_array_maps_each_index_to_its_variant(tmp_path, fakebin):
  res = tmp_path / "res"
  variants = sweeps.expand("attention", "paper", steps=30)
  text = make_script(variants, str(res), SlurmOptions(partition="gpu", gpus=1), title="t")
  assert "#SBATCH --array=0-11\n" in text and "#SBATCH --partition=gpu\n" in text
  assert "#SBATCH --gpus-per-node=1\n" in text and "#SBATCH --ntasks-per-node=1\n" in text
  script = tmp_path / "a.sbatch"
  script.write_text(text)
  seen = {}
  for i in range(len(variants)):
    r, srun = _run_task(script, i, fakebin, tmp_path)
    assert r.returncode == 0, r.stderr
    args = _launch_args(srun)
    assert srun[:2] == ["--nodes=1", "--ntasks-per-node=1"]
    config = args[0].removeprefix("--config=")
    workdir = next(a for a in args if a.startswith("--workdir=")).removeprefix("--workdir=")
    name = os.path.basename(workdir)
    assert workdir == f"{res}/attention_results/{name}" and args[-1] == "--overwrite"
    assert (config, f"--config.train.micro_batch={ATTENTION_PAPER[name][1]}") == (
        ATTENTION_PAPER[name][0], next(a for a in args if a.startswith("--config.train.micro_batch=")))
    assert "--config.train.steps=30" in args
    meta = json.loads((res / "attention_results" / name / runner.VARIANT_FILE).read_text())
    assert meta["name"] == name and meta["config"] == config
    seen[i] = name
  assert sorted(seen.values()) == sorted(ATTENTION_PAPER)
  r, _ = _run_task(script, 12, fakebin, tmp_path)
  assert r.returncode == 2 and "no variant for array index 12" in r.stderr


def test_index_command_parses_back_to_the_config(tmp_path, fakebin):
  # configs/base.py presets exist on every branch: the parsed config must be that preset plus the overrides.
  variants = [sweeps.Variant("attention", "a", "A", "configs/base.py:0.5B", (("train.micro_batch", "4"),)),
              sweeps.Variant("attention", "b", "B", "configs/base.py:3B", (("train.micro_batch", "1"),
                                                                          ("train.steps", "30")))]
  res = tmp_path / "res"
  script = tmp_path / "s.sbatch"
  script.write_text(make_script(variants, str(res), SlurmOptions(partition="p", gpus=4, max_parallel=1),
                                title="t"))
  assert "#SBATCH --array=0-1%1\n" in script.read_text()
  expected = {0: (896, 24, 4, 1000, "a"), 1: (2048, 36, 1, 30, "b")}  # Qwen2.5-0.5B / 3B widths and depths
  for i, (hidden, layers, mb, steps, name) in expected.items():
    r, srun = _run_task(script, i, fakebin, tmp_path)
    assert r.returncode == 0, r.stderr
    assert srun[:2] == ["--nodes=1", "--ntasks-per-node=4"]
    cfg, workdir, overwrite = sweeps.parse_launch_args(_launch_args(srun))
    assert (cfg.model.hidden, cfg.model.num_layers, cfg.train.micro_batch, cfg.train.steps) == (
        hidden, layers, mb, steps)
    assert workdir == f"{res}/attention_results/{name}" and overwrite


def test_finished_variant_skipped_unless_force_and_failure_recorded(tmp_path, fakebin):
  res = tmp_path / "res"
  v = sweeps.Variant("moe", "d", "D", "configs/base.py:tiny")
  script = tmp_path / "s.sbatch"
  script.write_text(make_script([v], str(res), SlurmOptions(partition="p", python=sys.executable), title="t"))
  wd = res / "moe_results" / "d"
  wd.mkdir(parents=True)
  (wd / "summary.json").write_text("{}")
  r, srun = _run_task(script, 0, fakebin, tmp_path)
  assert r.returncode == 0 and srun is None and "summary.json exists, skipping" in r.stdout
  # FORCE=1 reruns; this attempt fails: the task exits with srun's code and bench_failure.json holds the reason
  r, srun = _run_task(script, 0, fakebin, tmp_path, FORCE="1", FAKE_RC="3", FAKE_ERR="error: boom in launch")
  assert srun is not None and r.returncode == 3
  rec = json.loads((wd / runner.FAILURE_FILE).read_text())
  assert rec["reason"] == "error: boom in launch" and rec["returncode"] == 3


def test_slurm_cli_writes_the_script(tmp_path):
  r = subprocess.run([sys.executable, "-m", "launch.slurm", "moe", "--scale=paper", "--partition=big", "--gpus=8",
                      f"--results_dir={tmp_path}", "--config.train.steps=30", "--setup=source .venv/bin/activate"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  path = tmp_path / "slurm" / "moe_paper.sbatch"
  text = path.read_text()
  assert "#SBATCH --array=0-3\n" in text and "#SBATCH --gpus-per-node=8\n" in text
  assert "\nsource .venv/bin/activate\n" in text and text.count("--config.train.steps=30") >= 4
  assert r.stdout.startswith("#!/bin/bash") and f"# written to {path} (4 array tasks)" in r.stdout
  r = subprocess.run([sys.executable, "-m", "launch.slurm", "moe"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "--partition" in r.stderr


def test_xm_job_list_without_xmanager(tmp_path):
  from launch import xm_launch

  variants = sweeps.expand("attention", "paper", steps=30)
  units = xm_launch.work_units(variants, tmp_path, gpus=["0", "1"])
  assert len(units) == 12 and [u.wave for u in units] == [i // 2 for i in range(12)]
  assert [dict(u.env)["CUDA_VISIBLE_DEVICES"] for u in units] == ["0", "1"] * 6
  assert units[0].name == "attention-mqa_0-5B"
  for u, v in zip(units, variants):
    assert u.args[:2] == ("-m", "launch")
    cfg_arg, *rest = u.args[2:]
    assert cfg_arg == f"--config={ATTENTION_PAPER[v.name][0]}"
    assert f"--workdir={tmp_path}/attention_results/{v.name}" in rest and "--config.train.steps=30" in rest
  serial = xm_launch.work_units(variants[:3], tmp_path)
  assert [u.wave for u in serial] == [0, 1, 2] and all(u.env == () for u in serial)
  assert "xmanager" not in sys.modules


def test_bench_cli_passes_overrides_and_rejects_config_file(tmp_path):
  r = subprocess.run([sys.executable, "-m", "launch.bench", "attention", "--scale=smoke", "--dry_run",
                      f"--results_dir={tmp_path}", "--config.train.steps=7", "--only=mla_tiny,gqa_tiny"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if "would run" in l]
  assert [l.split(":")[0] for l in lines] == ["[1/2] attention/gqa_tiny", "[2/2] attention/mla_tiny"]
  assert all(l.count("--config.train.steps=") == 1 and "--config.train.steps=7 " in l for l in lines)
  r = subprocess.run([sys.executable, "-m", "launch.bench", "attention", "--config=configs/base.py"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "pass only --config.key=value overrides" in r.stderr


def test_sweep_of_takes_one_known_sweep_else_the_usage_line():
  from absl import app
  from efficientllm_jax.bench import cli
  assert cli.sweep_of(["launch.slurm", "moe"], "usage: x") == "moe"
  assert cli.sweep_of(["launch.slurm", "all"], "usage: x") == "all"
  for argv in (["launch.slurm"], ["launch.slurm", "mlp"], ["launch.slurm", "moe", "extra"]):
    with pytest.raises(app.UsageError, match="^usage: x$"):
      cli.sweep_of(argv, "usage: x")
