"""Shared test setup: a repo-local data cache and small config helpers."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EFFICIENTLLM_CACHE", str(ROOT / ".cache" / "test"))

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
