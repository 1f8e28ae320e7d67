"""Shared test setup: a repo-local data cache and small config helpers."""

import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EFFICIENTLLM_CACHE", str(ROOT / ".cache" / "test"))

# One JAX persistent compilation cache per session, made by the controlling process before jax is imported and
# inherited by the xdist workers and every subprocess a test launches: a program that several tests compile
# (the same tiny model in-process and through `python -m launch`) compiles once. Fresh per session, so no test
# ever starts from an earlier session's executables; removed at the end. Set JAX_COMPILATION_CACHE_DIR to choose.
_OWN_COMPILE_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_COMPILE_CACHE = tempfile.mkdtemp(prefix="efficientllm-jit-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# CPU-only machines (CI): XLA's cheapest backend optimisation for every test program, in-process and in launched
# subprocesses. It halves compile time, which dominates the suite; no test here measures CPU speed, and every
# comparison runs both sides under the same flags. A machine with an NVIDIA driver keeps the defaults.
if not Path("/dev/nvidiactl").exists() and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

from configs import base  # noqa: E402


def set_keys(cfg, overrides: dict):
  """Dotted-key overrides (`{"train.steps": 3}`) applied in place; returns cfg."""
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def load_config_file(relpath: str, arg: str, **overrides):
  """`get_config(arg)` of a config file under the repo (e.g. configs/attention/mla.py), plus overrides."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(f"cfg_{Path(relpath).stem}", ROOT / relpath)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return set_keys(mod.get_config(arg), overrides)


def tiny_config(**overrides):
  """The tiny preset with the byte tokenizer and a short corpus (fast), plus dotted overrides."""
  c = base.get_config("tiny")
  c.data.tokenizer = "bytes"
  c.data.max_corpus_mb = 2.0
  c.model.vocab_size = 512
  c.data.seq_len = 64
  c.train.micro_batch = 4
  c.train.steps = 20
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.eval_batches = 2
  return set_keys(c, overrides)


# The end-to-end "a variant trains with a falling loss" runs (test_attention, test_positional_e2e, test_moe): 12 steps
# of 4 x 64 tokens, enough for a tiny model's loss to fall clearly; every step logged. The config's BPE tokenizer is
# trained on 2 MB of the corpus, not the tiny preset's 8 (on a cold cache: ~4 s of CPU instead of ~16; 12 steps
# read 3K tokens of it either way).
E2E_OVERRIDES = {"train.steps": 12, "train.warmup_steps": 3, "train.log_every": 1, "train.eval_every": 0,
                 "train.eval_batches": 1, "train.micro_batch": 4, "data.seq_len": 64, "data.max_corpus_mb": 2.0}


def train_config_file(relpath: str, workdir, **overrides):
  """Trains the tiny preset of a config file (E2E_OVERRIDES, then `overrides`) end to end in this process, as
  `python -m launch --config=<relpath>:tiny` does after parsing its flags (the CLI itself: test_launch.py, and
  test_config.py for its errors). Returns (summary, rows of metrics.jsonl)."""
  from efficientllm_jax.train.loop import train_and_evaluate  # noqa: PLC0415
  summary = train_and_evaluate(load_config_file(relpath, "tiny", **{**E2E_OVERRIDES, **overrides}), workdir)
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return summary, rows


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture
def triton_h100(monkeypatch):
  """Pallas' Triton lowering targets an H100 without a GPU present: `jax.jit(f).trace(...).lower(
  lowering_platforms=("cuda",))` then runs the kernels through jaxpr -> Triton IR, so an unsupported primitive,
  tile shape or indexing form fails on CPU rather than on the GPU machine (Triton's own PTX compile, and with it
  the shared-memory limit, still happens only on the GPU). Returns a function: lowered HLO text -> number of
  Triton kernels in it."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415 - private, pinned jax
  h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
  return lambda hlo: hlo.count("__gpu$xla.gpu.triton")


def _heavy(item) -> bool:
  """Tests that launch subprocesses or train end to end (tens of seconds each)."""
  return item.get_closest_marker("slow") is not None or item.get_closest_marker("xdist_group") is not None


def pytest_collection_modifyitems(config, items):
  # Heavy tests first (stable order otherwise): under `-n 2` they start early and the many short tests fill the
  # gaps at the end, instead of one long test running alone on a single worker while the other idles.
  items.sort(key=lambda item: not _heavy(item))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  # `--dist loadgroup` marks a grouped test by appending "@group" to its node id on the worker; pytest 9.2 ignores
  # that write (pytest-xdist#1386), and the groups then spread over both workers without a word, each building the
  # group's expensive module fixture. Fail before any fixture is built instead, naming the fix.
  config = item.config
  if hasattr(config, "workerinput") and config.getvalue("loadgroup") and item.get_closest_marker("xdist_group"):
    if "@" not in item.nodeid[item.nodeid.rfind("]") + 1:]:
      pytest.fail(f"--dist loadgroup did not group this test (pytest {pytest.__version__}; pytest-xdist#1386): its "
                  "xdist_group fixture would be built on every worker; keep pytest<9.2 (requirements.txt)",
                  pytrace=False)


def pytest_unconfigure(config):
  if _OWN_COMPILE_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)
