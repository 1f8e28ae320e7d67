"""Every position kind trains the tiny model end to end through `python -m launch` with a falling loss.

Steps, batch and sequence match test_attention.test_launch_trains_tiny, so RoPE here (= GQA tiny there) reuses
that run's compiled programs through the session compile cache (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rope", "sinusoidal", "learned", "relative", "alibi", "none")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_tiny(kind, tmp_path):
  env = dict(os.environ, EFFICIENTLLM_CACHE=os.environ.get("EFFICIENTLLM_CACHE", "/tmp/elcache"))
  r = subprocess.run(
      [sys.executable, "-m", "launch", f"--config=configs/positional/{kind}.py:tiny", f"--workdir={tmp_path}",
       "--config.train.steps=12", "--config.train.warmup_steps=3", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.data.seq_len=64",
       "--config.train.micro_batch=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in rows if row.get("split") == "train" and "loss" in row]
  assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
