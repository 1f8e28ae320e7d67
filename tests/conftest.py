"""Shared test setup: a repo-local data cache and small config helpers."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("EFFICIENTLLM_CACHE", str(ROOT / ".cache" / "test"))

import pytest  # noqa: E402

from configs import base  # noqa: E402


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
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config
