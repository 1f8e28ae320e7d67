"""Training: loss falls, accumulation is exact, divergence stops with a message, runs are never overwritten."""

import json

import jax
import numpy as np
import pytest

from efficientllm_jax.train import loop, step as step_lib
from tests.conftest import tiny_config


def test_short_tiny_run_lowers_loss(tmp_path):
  cfg = tiny_config(**{"train.steps": 40, "train.eval_every": 20})
  s = loop.train_and_evaluate(cfg, tmp_path / "run")
  hist = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [h["loss"] for h in hist if h["split"] == "train"]
  evals = [h["loss"] for h in hist if h["split"] == "eval"]
  assert train[-1] < train[0] - 0.5
  assert evals[-1] < evals[0]
  assert s["PPL"] == pytest.approx(np.exp(s["eval_loss"]))
  assert s["first_loss"] > s["final_loss"]
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())


def test_gradient_accumulation_equals_one_big_batch():
  big = tiny_config(**{"train.micro_batch": 4, "train.grad_accum": 1})
  acc = tiny_config(**{"train.micro_batch": 2, "train.grad_accum": 2})
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, size=(4, 65)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  results = []
  for cfg, shape in ((big, (1, 4, 64)), (acc, (2, 2, 64))):
    built = step_lib.build(cfg)
    state, train_step = built.state, built.train_step
    new, metrics = train_step(state, {k: v.reshape(shape) for k, v in batch.items()})
    results.append((jax.device_get(new.params), float(metrics["loss"])))
  (p_big, l_big), (p_acc, l_acc) = results
  assert l_big == pytest.approx(l_acc, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_big, p_acc)


def test_nan_stops_with_message(tmp_path):
  cfg = tiny_config(**{"train.lr": 1e30, "train.min_lr": 0.0, "train.clip_norm": 0.0, "train.warmup_steps": 0})
  with pytest.raises(loop.TrainingDiverged, match=r"(loss|grad_norm) became (nan|inf) at step \d+: lower train.lr"):
    loop.train_and_evaluate(cfg, tmp_path / "run")


def test_existing_run_is_never_overwritten_silently(tmp_path):
  cfg = tiny_config(**{"train.steps": 2, "checkpoint.every": 0})  # no checkpoints: nothing to resume from
  loop.train_and_evaluate(cfg, tmp_path / "run")
  first = (tmp_path / "run" / "summary.json").read_text()
  with pytest.raises(loop.WorkdirError, match="already holds a run .*pass --overwrite"):
    loop.train_and_evaluate(cfg, tmp_path / "run")
  loop.train_and_evaluate(cfg, tmp_path / "run", overwrite=True)
  backups = list((tmp_path / "run").glob("previous-*"))
  assert len(backups) == 1 and (backups[0] / "summary.json").read_text() == first


_ONE_COMPILE = r"""
import jax, jax.numpy as jnp
from jax._src import config as jax_config
import efficientllm_jax
from efficientllm_jax.kernels.xent import softmax_xent
before = jax_config.trace_context()
f = jax.jit(lambda x: softmax_xent(x, jnp.zeros(4, jnp.int32), jnp.ones(4))[0].sum())
for _ in range(3):
  f(jnp.ones((4, 64)))
print(f._cache_size(), before == jax_config.trace_context())
"""


def test_a_pallas_kernel_does_not_make_jit_compile_twice():
  """Pallas registers a config option that joins every jit cache key the first time it traces a kernel; unless
  efficientllm_jax registers it at import (before anything compiles), the train step compiled again on its second
  call. A fresh interpreter, as a user's run: one compile for three calls, the trace context unchanged."""
  import subprocess
  import sys
  p = subprocess.run([sys.executable, "-c", _ONE_COMPILE], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split()[-2:] == ["1", "True"], p.stdout
