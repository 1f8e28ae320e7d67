"""Run by test_sharding.py as 2 processes x 2 CPU devices on JAX's distributed runtime (gloo collectives).

Each process feeds only its own rows of fixed global batches through step.global_batch, trains the tiny model
3 steps on a dp4 mesh that spans both processes, and (process 0) prints JSON: the losses, the global batch shape,
and what the leader-only writer and eval_batches did.
  python -m tests.multihost_check COORDINATOR_PORT PROCESS_ID WORKDIR
"""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

from efficientllm_jax.data import pipeline  # noqa: E402
from efficientllm_jax.metrics.writers import MetricWriter  # noqa: E402
from efficientllm_jax.train import step as step_lib  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

cfg = tiny_config(**{"train.micro_batch": 8, "train.lr": 1e-3, "train.warmup_steps": 0})
cfg.mesh.shape.data = 4
built = step_lib.build(cfg)
rng = np.random.default_rng(0)
state, losses = built.state, []
for _ in range(3):
  tok = rng.integers(0, cfg.model.vocab_size, size=(1, 8, cfg.data.seq_len + 1)).astype(np.int32)
  mine = tok[:, 4 * pid: 4 * (pid + 1)]  # this process's devices hold rows 4p..4p+3 of the dp4 batch
  batch = step_lib.global_batch({"inputs": mine[..., :-1], "targets": mine[..., 1:]}, built.train_batch_sharding)
  state, m = built.train_step(state, batch)
  losses.append(float(m["loss"]))

w = MetricWriter(workdir / f"w{pid}")
w.write(1, {"loss": 1.0})
w.close()
rows = np.arange(16 * cfg.data.seq_len, dtype=np.int32).reshape(16, cfg.data.seq_len)
source = [{"inputs": r, "targets": r} for r in rows]
ev = pipeline.eval_batches(source, cfg)
if pid == 0:
  print(json.dumps({"losses": losses, "batch_shape": list(batch["inputs"].shape),
                    "eval_first_rows": [int(r[0]) // cfg.data.seq_len for r in ev[0]["inputs"]],
                    "processes": jax.process_count(), "devices": jax.device_count()}))
jax.distributed.shutdown()
