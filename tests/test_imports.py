"""The command lines answer help, flag errors and dry runs without importing JAX, and every module that uses JAX
or Flax gets the settings of efficientllm_jax/jax_setup.py before anything compiles."""

import ast
import subprocess
import sys

import pytest

from launch import lazy_flags
from tests.conftest import ROOT

HEAVY = ("jax", "flax", "optax", "orbax", "grain", "tensorboardX", "matplotlib")
# Packages whose __init__ imports jax_setup: all their modules use JAX.
SETUP_IN_INIT = ("efficientllm_jax/kernels", "efficientllm_jax/models", "efficientllm_jax/train")


def _top_level_imports(path):
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_every_module_using_jax_or_flax_imports_jax_setup():
  missing = []
  for path in sorted((ROOT / "efficientllm_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel == "efficientllm_jax/jax_setup.py" or rel.startswith(SETUP_IN_INIT):
      continue
    names = _top_level_imports(path)
    if any(n.split(".")[0] in ("jax", "flax") for n in names) and "efficientllm_jax.jax_setup" not in names:
      missing.append(rel)
  assert not missing, f"import efficientllm_jax.jax_setup in {missing} (or in its package's __init__)"
  for pkg in SETUP_IN_INIT:
    assert "efficientllm_jax.jax_setup" in _top_level_imports(ROOT / pkg / "__init__.py"), pkg


_PROBE = """
import runpy, sys
sys.argv = [{module!r}, *{args!r}]
try:
  runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except BaseException:  # SystemExit, or the traceback of an unknown --config key
  pass
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("module,args", [
    ("launch", ["--help"]),
    ("launch", ["--config=configs/base.py:2B", "--workdir=unused"]),
    ("launch", ["--config=configs/moe/moe.py:tiny", "--config.train.stepz=5", "--workdir=unused"]),
    ("launch.bench", ["attention", "--scale=smoke", "--dry_run", "--results_dir=RESULTS"]),
    ("launch.bench", ["tables", "--results_dir=RESULTS", "--noplots"]),
    ("launch.slurm", ["moe", "--partition=p", "--results_dir=RESULTS"]),
])
def test_command_line_answers_without_jax(module, args, tmp_path):
  args = [a.replace("RESULTS", str(tmp_path)) for a in args]
  r = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, args=args, heavy=HEAVY)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.stdout.splitlines()[-1] == "HEAVY []", r.stdout[-2000:] + r.stderr[-2000:]


def test_a_flag_that_is_not_ours_imports_the_libraries_that_may_define_it():
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "", flag_values=fv)
  flags.DEFINE_string("config", None, "", flag_values=fv)
  ours = ["prog", "--workdir=w", "--nooverwrite", "--config=c.py:tiny", "--config.train.steps=5", "positional"]
  assert not lazy_flags.may_name_undefined_flag(ours, fv)
  for extra in ("--grain_py_debug_mode", "--nograin_py_debug_mode", "-experimental_orbax_use_distributed_barrier",
                "--helpfull", "--helpxml", "--flagfile=f.txt"):
    assert lazy_flags.may_name_undefined_flag([*ours, extra], fv), extra
  assert not lazy_flags.may_name_undefined_flag(["prog", "--", "--grain_py_debug_mode"], fv)
