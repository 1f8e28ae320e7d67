"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before jax starts).

Trains the tiny model 3 steps on fixed batches on each mesh given on the command line and on one device,
and prints JSON: losses per mesh, and the PartitionSpecs the parameters ended up with.
"""

import json
import sys

import jax
import numpy as np

from efficientllm_jax.train import step as step_lib
from tests.conftest import tiny_config

MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1, expert=1),
    "dp8": dict(data=8, fsdp=1, tensor=1, expert=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1, expert=1),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2, expert=1),
    "fsdp4_ep2": dict(data=1, fsdp=4, tensor=1, expert=2),
}


def run(name: str, overrides: dict) -> dict:
  cfg = tiny_config(**{"train.micro_batch": 8, "train.lr": 1e-3, "train.warmup_steps": 0, **overrides})
  for axis, size in MESHES[name].items():
    cfg.mesh.shape[axis] = size
  devices = jax.devices()[: int(np.prod(list(MESHES[name].values())))]
  from efficientllm_jax.parallel import sharding as sh
  built = step_lib.build(cfg, mesh=sh.make_mesh(cfg, devices))
  rng = np.random.default_rng(0)
  state, losses = built.state, []
  for _ in range(3):
    tok = rng.integers(0, cfg.model.vocab_size, size=(1, 8, cfg.data.seq_len + 1)).astype(np.int32)
    state, m = built.train_step(state, {"inputs": tok[..., :-1], "targets": tok[..., 1:]})
    losses.append(float(m["loss"]))
  specs = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    specs[jax.tree_util.keystr(path)] = [None if a is None else (list(a) if isinstance(a, tuple) else a)
                                         for a in leaf.sharding.spec]
  return {"losses": losses, "specs": specs, "devices": len(leaf.sharding.device_set)}


if __name__ == "__main__":
  overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  print(json.dumps({name: run(name, overrides) for name in sys.argv[1].split(",")}))
