"""Multi-host initialisation on JAX's own distributed runtime.

`mesh.distributed`: "auto" initialises when the environment says the job spans several processes (slurm with
more than one task, an explicit coordinator address, or a multi-host TPU slice, which JAX detects itself);
"on" always initialises (auto-detection, or the explicit `mesh.coordinator_address`, `mesh.num_processes`,
`mesh.process_id`); "off" never does.
"""

from __future__ import annotations

import os

import jax

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles

_done = False


def wants_distributed(cfg, environ=os.environ) -> bool:
  mode = cfg.mesh.distributed
  if mode == "off":
    return False
  if mode == "on":
    return True
  slurm_tasks = int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1)
  return bool(slurm_tasks > 1 or cfg.mesh.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
              or environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def initialize(cfg) -> None:
  """Idempotent: calls jax.distributed.initialize once, before any device is touched."""
  global _done
  if _done or not wants_distributed(cfg):
    return
  kw = {}
  if cfg.mesh.coordinator_address:
    kw = dict(coordinator_address=cfg.mesh.coordinator_address, num_processes=int(cfg.mesh.num_processes),
              process_id=int(cfg.mesh.process_id))
  jax.distributed.initialize(**kw)
  _done = True
