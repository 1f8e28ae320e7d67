"""The training loop: dispatch step t, then read step t-1's scalars, so the device never waits on logging.

Per-step wall times come from the moments step t-1's scalars arrive (the device is kept one step ahead);
step 0 carries compilation and is reported apart as compile time. Non-finite loss stops the run with a message.
Timing, device sampling, profiling and summary.json belong to metrics/efficiency.py's `Efficiency` (`eff`):
the loop only calls its hooks. Checkpoints (train/checkpoint.py): a workdir whose checkpoints/ holds a finished
checkpoint resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from efficientllm_jax import config as config_lib
from efficientllm_jax.data import pipeline
from efficientllm_jax.metrics.efficiency import Efficiency
from efficientllm_jax.metrics.writers import MetricWriter, progress_line
from efficientllm_jax.models.transformer import param_counts
from efficientllm_jax.train import checkpoint as checkpoint_lib
from efficientllm_jax.train import optimizer
from efficientllm_jax.train import step as step_lib

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "tb", checkpoint_lib.CHECKPOINTS)


class TrainingDiverged(RuntimeError):
  """Loss became NaN/inf; str(err) is the one line to show."""


class WorkdirError(ValueError):
  """The workdir already holds a run; str(err) is the one line to show."""


def prepare_workdir(workdir: Path, *, overwrite: bool) -> int | None:
  """Returns the step to resume from when the workdir holds checkpoints (0: a run killed before its first one),
  else None; refuses to mix with an earlier run without checkpoints; with overwrite=True moves an earlier run aside
  into previous-<time>/ (never deletes)."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".write-test").touch()
    (workdir / ".write-test").unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror or e}): pick a --workdir you can write "
                       "to") from None
  existing = [f for f in RUN_FILES if (workdir / f).exists()]
  if not existing:
    return None
  if not overwrite:
    if (workdir / checkpoint_lib.CHECKPOINTS).is_dir():
      return checkpoint_lib.latest_step(workdir / checkpoint_lib.CHECKPOINTS) or 0
    raise WorkdirError(f"workdir {workdir} already holds a run ({', '.join(existing)}) without checkpoints to "
                       "resume: pick a new --workdir, or pass --overwrite to move the old run into a "
                       "previous-<time>/ subfolder")
  backup = workdir / time.strftime("previous-%Y%m%d-%H%M%S")
  backup.mkdir()
  for f in existing:
    shutil.move(str(workdir / f), str(backup / f))


def _agree_on_workdir(workdir: Path, overwrite: bool) -> int | None:
  """Multi-host: process 0 alone checks (and with overwrite moves aside) the workdir, which may be a shared
  filesystem; every process gets its verdict, so no process sees a half-prepared directory."""
  from jax.experimental import multihost_utils
  err, resume = None, None
  if jax.process_index() == 0:
    try:
      resume = prepare_workdir(workdir, overwrite=overwrite)
    except WorkdirError as e:
      err = e
  code = -2 if err else (-1 if resume is None else resume)
  code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
  if code == -2:
    raise err or WorkdirError(f"workdir {workdir} was refused by process 0 (its error says why and how to fix it)")
  workdir.mkdir(parents=True, exist_ok=True)
  return None if code == -1 else code


def evaluate(eval_step, params, batches) -> dict:
  sums = [eval_step(params, b) for b in batches]
  loss_sum, count = (float(sum(np.asarray(s[i]) for s in sums)) for i in (0, 1))
  loss = loss_sum / max(count, 1.0)
  return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


def flatten_scalars(metrics: dict) -> dict[str, float]:
  """Scalars as floats; a vector metric (e.g. per-expert load) becomes name_0, name_1, ..."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 0:
      out[k] = float(a)
    else:
      out.update({f"{k}_{i}": float(x) for i, x in enumerate(a.reshape(-1))})
  return out


def _check_finite(step: int, m: dict) -> None:
  bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])]
  if bad:
    raise TrainingDiverged(f"{bad[0]} became {m[bad[0]]} at step {step}: lower train.lr, keep train.clip_norm > 0, "
                           "or check the data")


def train_and_evaluate(cfg, workdir: str | Path, *, overwrite: bool = False) -> dict:
  """Trains `cfg` (validated here first) in `workdir`; returns the summary written to summary.json."""
  config_lib.validate(cfg)
  workdir = Path(workdir)
  # --- checkpoints: resume a workdir that has them (train/checkpoint.py) ---
  resume = prepare_workdir(workdir, overwrite=overwrite) if jax.process_count() == 1 else _agree_on_workdir(
      workdir, overwrite)
  ckpt = checkpoint_lib.Checkpointer(cfg, workdir)
  if resume is not None:
    if resume >= cfg.train.steps:
      ckpt.close()
      if resume == cfg.train.steps and (workdir / "summary.json").exists():
        print(f"workdir {workdir} holds a finished run (step {resume} of {resume}): nothing to do; raise "
              "--config.train.steps to continue it, or pass --overwrite to start over")
        return json.loads((workdir / "summary.json").read_text())
      raise WorkdirError(f"workdir {workdir} has a checkpoint at step {resume}, past train.steps="
                         f"{cfg.train.steps}: raise --config.train.steps to continue, or pass --overwrite")
    if resume:
      ckpt.check_config(resume)
    checkpoint_lib.trim_metrics(workdir / "metrics.jsonl", resume)
  # --- end checkpoints ---
  if jax.process_index() == 0:  # one writer per workdir (it may sit on a filesystem every host shares)
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
  splits = pipeline.make_splits(cfg)
  writer = MetricWriter(workdir)
  t = cfg.train
  counts = param_counts(cfg)
  tokens_per_step = t.micro_batch * t.grad_accum * cfg.data.seq_len
  writer.print(f"model {cfg.size}: {counts['total']:,} params ({counts['non_embedding']:,} non-embedding) | "
               f"attention {cfg.attention.kind}/{cfg.attention.impl} | position {cfg.position.kind} | "
               f"ffn {cfg.ffn.kind} | {jax.device_count()} x {jax.devices()[0].device_kind}")
  writer.print(f"data: {splits.description}; {len(splits.train):,} train / {len(splits.eval):,} eval sequences "
               f"of {cfg.data.seq_len}; {tokens_per_step:,} tokens/step")

  try:
    with Efficiency(cfg, counts, workdir=workdir, writer=writer) as eff:  # sampler, compile timer, profiler
      return _train(cfg, splits, writer, eff, ckpt, resume)
  finally:
    ckpt.close()  # waits for an in-flight async save
    writer.close()


def _train(cfg, splits, writer, eff: Efficiency, ckpt, resume) -> dict:
  t = cfg.train
  built = step_lib.build(cfg)
  state, train_step, eval_step = built.state, built.train_step, built.eval_step
  batches = pipeline.train_iterator(splits.train, cfg)
  held_out = [step_lib.global_batch(b, built.eval_batch_sharding) for b in pipeline.eval_batches(splits.eval, cfg)]
  # --- checkpoints: restore, or start from init.checkpoint ---
  start = 0
  if resume:
    state, start = ckpt.restore(resume, state, batches), resume
    writer.print(f"resuming from the checkpoint at step {start} in {ckpt.directory}")
  elif resume == 0:
    writer.print(f"restarting from step 0: no finished checkpoint in {ckpt.directory}")
  if not resume and cfg.init.checkpoint:
    params = checkpoint_lib.load_init_params(cfg, state.params)
    state = state.replace(params=params, opt_state=optimizer.with_params(state.opt_state, params))
    writer.print(f"initial weights: {cfg.init.checkpoint}")
  # --- end checkpoints ---

  history, evals = [], []
  pending = None

  def finish(step: int, metrics) -> None:
    """Reads step `step`'s scalars (blocks until it is done) and logs at the interval."""
    m = flatten_scalars(jax.device_get(metrics))
    eff.step_done(step, time.perf_counter())
    _check_finite(step, m)
    history.append(m["loss"])
    if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
      m.update(eff.interval_scalars())
      writer.write(step + 1, m)
      writer.print(progress_line(step + 1, t.steps, m))

  def run_eval(step: int) -> None:
    eff.pause()  # eval time is not step time, nor in the energy / memory window
    e = evaluate(eval_step, state.params, held_out)
    evals.append({"step": step, **e})
    writer.write(step, e, prefix="eval")
    writer.print(f"eval @ {step}: loss {e['loss']:.4f} | ppl {e['ppl']:.2f}")
    eff.resume(time.perf_counter())

  for i in range(start, t.steps):
    batch = step_lib.global_batch(next(batches), built.train_batch_sharding)
    if i == start:
      eff.inspect_compiled(train_step, state, batch)  # compiles here; logs XLA's memory_analysis once
    with eff.annotate(i):
      state, metrics = train_step(state, batch)
    ckpt.maybe_save(i + 1, state, batches)
    if pending is not None:
      finish(*pending)
    pending = (i, metrics)
    if t.eval_every and (i + 1) % t.eval_every == 0 and i + 1 < t.steps:
      finish(*pending)
      pending = None
      run_eval(i + 1)
  if pending is not None:
    finish(*pending)
  run_eval(t.steps)

  summary = eff.finish(eval_loss=evals[-1]["loss"], final_loss=history[-1], first_loss=history[0])
  ckpt.save_final(t.steps, state, batches)  # after summary.json: a final checkpoint means a finished run
  return summary
