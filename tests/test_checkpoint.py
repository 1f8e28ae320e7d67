"""Checkpoints: the SIGKILL-and-resume test, NaN handling, half-written checkpoints, and workdir errors."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from efficientllm_jax import config as config_lib
from efficientllm_jax.data import prepare
from efficientllm_jax.train import checkpoint as ckpt_lib
from efficientllm_jax.train import loop, step as step_lib

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("ds")
  rng = random.Random(0)
  words = "the quick brown fox jumps over lazy dogs while seven wizards box".split()
  lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))}) for _ in range(300)]
  (root / "a.jsonl").write_text("\n".join(lines) + "\n")
  prepare.prepare([str(root / "a.jsonl")], root / "out", prepare.Options("bytes", 32, eval_fraction=0.05),
                  stream=io.StringIO())
  return root / "out"


def overrides(dataset: Path) -> list[str]:
  return [f"--config.data.path={dataset}", "--config.data.source=arrayrecord", "--config.data.seq_len=32",
          "--config.model.vocab_size=512", "--config.train.micro_batch=2", f"--config.train.steps={STEPS}",
          "--config.train.warmup_steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.eval_batches=1", f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=2"]


def launch_cmd(dataset: Path, workdir: Path) -> list[str]:
  return [sys.executable, "-m", "launch", "--config=configs/base.py:tiny", f"--workdir={workdir}",
          *overrides(dataset)]


def env(tmp: Path) -> dict:
  # A shared persistent compilation cache: the restarted processes reuse the first one's executables.
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}


def losses(workdir: Path) -> dict[int, float]:
  out: dict[int, float] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "train":
      assert r["step"] not in out, f"step {r['step']} logged twice"
      out[r["step"]] = r["loss"]
  return out


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(dataset, tmp_path):
  seed = int(time.time() * 1000) % 100_000
  rng = random.Random(seed)
  kill_after = rng.randint(2, STEPS - 3)  # the step whose log line triggers the kill
  # The kill lands up to one step period (the time between the last two log lines) after that line: anywhere in
  # the next step, saves included, and always with >= 2 steps, the final save and the summary still to run. (A
  # fixed delay of up to 0.3 s outlasted the last steps of this tiny run, which then finished before the kill.)
  frac = rng.random()
  why = f"(seed {seed}: kill after step {kill_after} + {frac:.2f} step)"

  ref = subprocess.run(launch_cmd(dataset, tmp_path / "ref"), cwd=ROOT, env=env(tmp_path), capture_output=True,
                       text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-2000:]

  work = tmp_path / "run"
  proc = subprocess.Popen(launch_cmd(dataset, work), cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    seen = None  # when the previous step's log line came
    for line in proc.stdout:
      if re.match(rf"step\s+{kill_after - 1}/{STEPS}\b", line):
        seen = time.perf_counter()
      if re.match(rf"step\s+{kill_after}/{STEPS}\b", line):
        time.sleep(frac * (time.perf_counter() - seen))
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL, why
  assert not (work / "summary.json").exists(), why

  resumed = subprocess.run(launch_cmd(dataset, work), cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  m = re.search(r"resuming from the checkpoint at step (\d+)|restarting from step 0", resumed.stdout)
  assert m, resumed.stdout[:2000]
  start = int(m.group(1) or 0)
  assert start % EVERY == 0 and start <= kill_after + 1, why

  want, got = losses(tmp_path / "ref"), losses(work)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), why
  assert got == want, why  # bit-exact: same parameters, optimizer state and data order after the restart
  summary = json.loads((work / "summary.json").read_text())
  assert summary["eval_loss"] == json.loads((tmp_path / "ref" / "summary.json").read_text())["eval_loss"], why
  assert ckpt_lib.latest_step(work / "checkpoints") == STEPS


# --- the Checkpointer on a small state, no model ---------------------------------------------------------------

class Seq:
  def __len__(self):
    return 50

  def __getitem__(self, i):
    return np.full(3, i, np.int32)


def data_iter():
  return iter(grain.MapDataset.source(Seq()).shuffle(seed=1).repeat().to_iter_dataset())


def small_cfg(every=2, keep=2, steps=10):
  c = base.get_config("tiny")
  c.checkpoint.every, c.checkpoint.keep, c.train.steps = every, keep, steps
  return config_lib.validate(c)


def small_state(v: float):
  return {"w": jnp.full((4, 3), v, jnp.float32), "step": jnp.array(-1 if math.isnan(v) else int(v), jnp.int32)}


def run_steps(ck, it, steps, poison_at=None):
  for s in range(1, steps + 1):
    next(it)
    v = float("nan") if poison_at is not None and s >= poison_at else float(s)
    ck.maybe_save(s, small_state(v), it)


def test_saves_every_n_keeps_k_and_restores_state_and_data_position(tmp_path):
  cfg = small_cfg()
  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  it = data_iter()
  run_steps(ck, it, 7)
  expect_next = [int(next(it)[0]) for _ in range(3)]  # what follows step 7's batch
  ck.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") == 6

  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  it2 = data_iter()
  state = ck.restore(6, small_state(0.0), it2)
  np.testing.assert_array_equal(state["w"], np.full((4, 3), 6.0))
  ref = data_iter()
  for _ in range(6):
    next(ref)
  assert [int(next(it2)[0]) for _ in range(4)] == [int(next(ref)[0]) for _ in range(4)]
  ck.close()
  assert expect_next  # (consumed only to show the saved position is step 6's, not the live iterator's)


def test_non_finite_state_is_never_saved(tmp_path):
  ck = ckpt_lib.Checkpointer(small_cfg(keep=5), tmp_path)
  run_steps(ck, data_iter(), 9, poison_at=5)
  ck.close()
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") == 4
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_half_written_checkpoints_are_never_restored(tmp_path):
  cfg = small_cfg()
  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  run_steps(ck, data_iter(), 4)
  ck.close()
  d = tmp_path / "checkpoints"
  # What a SIGKILL mid-save leaves: orbax's temporary directories, never renamed to the step number.
  # (orbax 0.12 names them <step>.orbax-checkpoint-tmp; older versions appended -<timestamp>)
  shutil.copytree(d / "4", d / "6.orbax-checkpoint-tmp")
  (d / "6.orbax-checkpoint-tmp" / "state" / "garbage").write_bytes(os.urandom(64))
  (d / "8.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  assert ckpt_lib.latest_step(d) == 4
  assert loop.prepare_workdir(tmp_path, overwrite=False) == 4
  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  assert ck.restore(4, small_state(0.0), data_iter())["w"][0, 0] == 4.0
  ck.close()
  assert not (d / "6.orbax-checkpoint-tmp").exists()  # a restart removes orbax's leftovers (in the background)


def test_resume_refuses_a_different_model(tmp_path):
  ck = ckpt_lib.Checkpointer(small_cfg(), tmp_path)
  run_steps(ck, data_iter(), 2)
  ck.close()
  cfg = small_cfg()
  cfg.model.hidden = 64
  with pytest.raises(ckpt_lib.CheckpointError, match=r"the checkpoint at step 2 in .* was written with another "
                                                     r"config: model.hidden=64 \(checkpoint: 128\); resume with"):
    ckpt_lib.Checkpointer(cfg, tmp_path).check_config(2)


def test_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(loop.WorkdirError, match=r"workdir .*file/run is not writable \(.*\): pick a --workdir"):
    loop.prepare_workdir(tmp_path / "file" / "run", overwrite=False)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"cannot write checkpoints to .*: pick a --workdir"):
    ckpt_lib.Checkpointer(small_cfg(), tmp_path / "file")


def test_a_run_without_checkpoints_is_still_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(loop.WorkdirError, match=r"already holds a run \(metrics.jsonl\) without checkpoints to resume"):
    loop.prepare_workdir(tmp_path, overwrite=False)
  (tmp_path / "checkpoints").mkdir()  # killed before its first checkpoint: restart from 0
  assert loop.prepare_workdir(tmp_path, overwrite=False) == 0


def test_trim_metrics_drops_records_past_the_resume_step(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in range(1, 8)) + '{"step": 8, "spl')
  ckpt_lib.trim_metrics(p, 5)
  assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5]


# --- NaN during a real run ---------------------------------------------------------------------------------------

def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
  real_build = step_lib.build

  def poisoned_build(cfg):
    built = real_build(cfg)

    def step(state, batch):
      state, metrics = built.train_step(state, batch)
      if int(state.step) == 5:  # the update of step 5 blows the weights up
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return state, metrics

    return built._replace(train_step=step)

  monkeypatch.setattr(step_lib, "build", poisoned_build)
  c = base.get_config("tiny")
  c.data.source, c.data.path, c.data.seq_len = "arrayrecord", str(dataset), 32
  c.model.vocab_size, c.train.micro_batch, c.train.steps = 512, 2, 10
  c.train.eval_every, c.train.eval_batches, c.train.log_every = 0, 1, 1
  c.checkpoint.every, c.checkpoint.keep = 2, 5
  with pytest.raises(loop.TrainingDiverged, match=r"loss became nan at step 5: lower train.lr"):
    loop.train_and_evaluate(c, tmp_path)
  d = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [2, 4]
  assert loop.prepare_workdir(tmp_path, overwrite=False) == 4


def test_master_weights_state_round_trips(tmp_path):
  """train.master_weights: the fp32 copy in the optimizer state is saved and restored bit for bit with the bf16
  parameters (a resumed run continues from the copy, not from the rounded parameters)."""
  cfg = small_cfg(every=1, steps=3)
  cfg.model.param_dtype, cfg.train.master_weights = "bfloat16", True
  built = step_lib.build(config_lib.validate(cfg))
  state = built.state.replace(opt_state=built.state.opt_state._replace(
      master=jax.tree.map(lambda m: m + 1e-5, built.state.opt_state.master)))  # not a rounding of the params
  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  it = data_iter()
  next(it)
  assert ck.maybe_save(1, state, it)
  ck.close()
  ck = ckpt_lib.Checkpointer(cfg, tmp_path)
  got = ck.restore(1, built.state, data_iter())
  ck.close()
  assert jax.tree.leaves(got.opt_state.master)[0].dtype == jnp.float32
  assert jax.tree.leaves(got.params)[0].dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, state)
