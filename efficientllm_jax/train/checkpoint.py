"""Orbax checkpoints of a run in <workdir>/checkpoints, and initial weights from `tools.import_hf`.

A checkpoint is one orbax step directory with four items: `state` (TrainState: params, optimizer state, step,
RNG), `data` (the grain iterator's position, one JSON per process, grain's own handler), `meta` (the config
sections that must match to resume). Saves are asynchronous (the device-to-host copy blocks, the writes do not)
and atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once every item is on
disk, and lists only renamed steps, so a SIGKILL at any moment leaves at worst a temporary directory that is
never restored (and is removed on the next start). A state with a NaN/inf anywhere is never saved: after a
divergence the newest checkpoint is the last good one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
# Sections whose change makes a checkpoint meaningless for this run (shapes, math, or data order).
MATCHED_SECTIONS = ("model", "attention", "position", "ffn", "moe", "data")
UNMATCHED_DATA_KEYS = ("prefetch", "cache_dir")  # reading speed, not order


class CheckpointError(ValueError):
  """A checkpoint cannot be written or used; str(err) is the one line to show."""


def _options(cfg, *, read_only: bool = False) -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.checkpoint.keep), enable_async_checkpointing=bool(cfg.checkpoint.async_save),
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)


def latest_step(directory: Path) -> int | None:
  """Newest finalized step under `directory` (orbax skips unfinished *.orbax-checkpoint-tmp* directories)."""
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
           and ocp.step.is_path_finalized(p)]
  return max(steps) if steps else None


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _matched_config(cfg) -> dict:
  d = json.loads(json.dumps(cfg.to_dict(), default=str))
  out = {k: d[k] for k in MATCHED_SECTIONS if k in d}
  for k in UNMATCHED_DATA_KEYS:
    out.get("data", {}).pop(k, None)
  return out


def _first_difference(a, b, prefix: str = "") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
      if d:
        return d
    return None
  return None if a == b else f"{prefix[:-1]}={b!r} (checkpoint: {a!r})"


class Checkpointer:
  """Saves every `checkpoint.every` steps and at the end; restores the newest checkpoint of a resumed run."""

  def __init__(self, cfg, workdir: Path):
    self.cfg = cfg
    self.every = int(cfg.checkpoint.every)
    self.total = int(cfg.train.steps)
    self.directory = Path(workdir) / CHECKPOINTS
    self.last_saved: int | None = None
    self.mgr = None
    if self.every or latest_step(self.directory) is not None:
      try:
        self.mgr = ocp.CheckpointManager(self.directory.resolve(), options=_options(cfg))
      except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {self.directory} ({e.strerror or e}): pick a --workdir "
                              "you can write to, or set --config.checkpoint.every=0") from None

  # --- resume -----------------------------------------------------------------------------------------------------
  def check_config(self, step: int) -> None:
    """Refuses to resume a checkpoint written under a different model / data config."""
    saved = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["config"]
    diff = _first_difference(saved, _matched_config(self.cfg))
    if diff:
      raise CheckpointError(f"the checkpoint at step {step} in {self.directory} was written with another config: "
                            f"{diff}; resume with the run's own config or pass --overwrite to start over")

  def restore(self, step: int, state, data_iter):
    """The TrainState saved at `step` (placed like `state`); moves `data_iter` to its saved position."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      got = self.mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"the checkpoint at step {step} in {self.directory} cannot be restored "
                            f"({str(e).splitlines()[0][:200]}): pass --overwrite to start over") from None
    self.last_saved = step
    return got["state"]

  # --- save -------------------------------------------------------------------------------------------------------
  def maybe_save(self, step: int, state, data_iter) -> bool:
    """Called after each step is dispatched with the state after `step` steps; saves at multiples of `every`
    (the last step is saved by `save_final`, after summary.json exists)."""
    if not self.every or step % self.every or step >= self.total:
      return False
    return self._save(step, state, data_iter)

  def save_final(self, step: int, state, data_iter) -> bool:
    if self.mgr is None or self.last_saved == step:
      return False
    return self._save(step, state, data_iter)

  def _save(self, step: int, state, data_iter) -> bool:
    if not bool(_all_finite(state)):  # blocks on this step: fine, it is one step in `every`
      logging.warning("step %d: non-finite values in the train state, checkpoint not saved", step)
      return False
    meta = {"step": step, "config": _matched_config(self.cfg)}
    self.mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)))
    self.last_saved = step
    return True

  def close(self) -> None:
    """Waits for the in-flight save (an async write finishes before the process may exit cleanly)."""
    if self.mgr is not None:
      self.mgr.wait_until_finished()
      self.mgr.close()


def trim_metrics(path: Path, step: int) -> None:
  """Drops metrics.jsonl records past `step`: the resumed run writes them again (identically), once."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line).get("step", 0) > step:
        continue
    except json.JSONDecodeError:
      continue  # a line cut by the kill
    keep.append(line)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(x + "\n" for x in keep))
  tmp.replace(path)


# --- initial weights ----------------------------------------------------------------------------------------------

INIT_PARAMS = "params"
INIT_MODEL = "model_config.json"


def load_init_params(cfg, params):
  """The parameters of `init.checkpoint` (written by tools.import_hf), placed like `params`."""
  from efficientllm_jax.tools import convert  # noqa: PLC0415 (keeps flax model code out of the import path)
  root = Path(cfg.init.checkpoint).expanduser()
  if not (root / INIT_MODEL).is_file() or not (root / INIT_PARAMS).is_dir():
    raise CheckpointError(f"init.checkpoint={str(root)!r} is not a directory written by "
                          "python -m efficientllm_jax.tools.import_hf (no model_config.json / params/)")
  saved = json.loads((root / INIT_MODEL).read_text())
  diff = _first_difference(saved, convert.model_fields(cfg))
  if diff:
    raise CheckpointError(f"init.checkpoint={str(root)!r} does not fit the config: {diff}; use "
                          f"--config=configs/hf.py:{root}, which takes the model shape from the checkpoint")
  abstract = convert.stacked_abstract(cfg)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      pure = ckptr.restore((root / INIT_PARAMS).resolve(), abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"init.checkpoint={str(root)!r} cannot be read ({str(e).splitlines()[0][:200]}): "
                          "re-run tools.import_hf") from None
  pure = convert.to_model_layout(cfg, jax.tree.map(np.asarray, pure))
  target = params.to_pure_dict()
  placed = jax.tree.map(lambda x, t: jax.device_put(jnp.asarray(x, t.dtype), t.sharding), pure, target)
  params.replace_by_pure_dict(placed)
  return params
