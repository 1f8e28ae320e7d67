"""Expert-parallel MoE (models/moe_ep.py): the shard_map layer on 8 simulated CPU devices equals the one-device
dropless layer (outputs, aux values, gradients), capacity drops match a count from the routing alone, the GPU
exchange and kernels lower; config errors; the receive-buffer bound and the regrouping against hand counts."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs.moe import moe as moe_configs
from efficientllm_jax import config as config_lib
from efficientllm_jax.models import moe_ep
from tests.conftest import ROOT

EXACT_CASES = ("ep2_fsdp2_tp2", "ep4_dp2", "ep8", "ep4_dp2_gspmd")
_EP = pytest.mark.xdist_group("expert_parallel")  # one subprocess for the module, on one xdist worker


@pytest.fixture(scope="module")
def ep_runs():
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "tests.ep_check"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@_EP
@pytest.mark.parametrize("case", EXACT_CASES)
def test_layer_equals_single_device_dropless(ep_runs, case):
  run = ep_runs[case]
  assert run["shard_map"] == (not case.endswith("gspmd"))  # the path under test really ran (or did not)
  assert run["y"] < 1e-5 and run["dropped_frac"] == 0.0
  assert max(run["aux"].values()) < 1e-5, run["aux"]  # aux loss, z loss, balance, router z, load
  assert len(run["grads"]) == 5, run["grads"]  # router, gate, up, down, x
  assert max(run["grads"].values()) < 1e-5, run["grads"]


@_EP
def test_capacity_drops_are_counted_and_contribute_zero(ep_runs):
  run = ep_runs["ep4_fsdp2_cap"]
  assert run["shard_map"] and run["subset_err"] < 1e-5  # each token = sum of a subset of its weighted experts
  assert run["dropped_expected"] > 0
  assert run["dropped_reported"] == run["dropped_by_output"] == run["dropped_expected"]
  assert max(run["aux"].values()) < 1e-5  # routing statistics are taken before drops, as without EP


@_EP
def test_gpu_path_lowers_for_h100(ep_runs):
  # ragged_all_to_all twice forward, twice in the transpose; gmm: 2 forward kernels, dx and dw for each backward.
  assert ep_runs["gpu_lowering"] == {"ragged_all_to_all": 4, "triton_kernels": 6}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 4, reason="needs 4 GPUs")
def test_gpu_exchange_and_kernel_equal_single_device():
  """On 4 GPUs: the default exchange (padded all_to_all) and the Pallas grouped matmul inside the shard_map, fp32."""
  from tests import ep_check  # noqa: PLC0415 - imports the model stack; only this test needs it
  assert moe_ep.resolve_exchange("auto") == "all_to_all"
  runs = ep_check.gpu_cases()
  for case, run in runs.items():
    assert run["shard_map"], case
    assert max(run["aux"].values()) < 1e-5, (case, run["aux"])
    if case.endswith("cap"):
      assert run["subset_err"] < 1e-4 and run["dropped_expected"] > 0, run
      assert run["dropped_reported"] == run["dropped_by_output"] == run["dropped_expected"], run
      continue
    assert run["y"] < 1e-4 and run["dropped_frac"] == 0.0, (case, run)
    assert max(run["grads"].values()) < 1e-4, (case, run["grads"])


def test_receive_buffer_bound():
  # Dropless: every token of every source may pick this device's experts: S * n * min(k, E/S).
  assert moe_ep.buffer_rows(n=64, k=2, experts_per_device=2, devices=4, capacity_factor=0) == 4 * 64 * 2
  assert moe_ep.buffer_rows(n=64, k=2, experts_per_device=1, devices=8, capacity_factor=0) == 8 * 64
  assert moe_ep.buffer_rows(n=64, k=2, experts_per_device=2, devices=4, capacity_factor=1.25) == 160
  assert moe_ep.buffer_rows(n=64, k=2, experts_per_device=2, devices=4, capacity_factor=100) == 512  # capped


def test_regroup_sorts_received_rows_by_local_expert():
  # Two sources x two local experts: source 0 sent [e0, e1, e1], source 1 sent [e0, e0, e1], then 2 padding rows.
  kept_se = np.array([[1, 2], [2, 1]])
  order, inverse = jax.jit(moe_ep.regroup, static_argnums=1)(kept_se, 8)
  assert list(order) == [0, 3, 4, 1, 2, 5, 6, 7]
  assert list(np.asarray(order)[np.asarray(inverse)]) == list(range(8))


@pytest.mark.parametrize("override, message", [
    ({"moe.expert_parallel": "manual"}, "moe.expert_parallel='manual' is not known: use one of auto, shard_map, gspmd"),
    ({"moe.ep_exchange": "nccl"}, "moe.ep_exchange='nccl' is not known"),
    ({"moe.ep_capacity_factor": "x"}, "moe.ep_capacity_factor='x' must be a number"),
    ({"mesh.shape.expert": 8, "mesh.shape.data": 1, "moe.num_experts": 12, "moe.top_k": 2},
     "moe.num_experts=12 is not divisible by mesh.shape.expert=8"),
    ({"moe.expert_parallel": "shard_map", "moe.capacity_factor": 1.25},
     "moe.expert_parallel='shard_map' runs the dropless path, but moe.capacity_factor=1.25"),
    ({"moe.ep_exchange": "ragged_all_to_all"}, "moe.ep_exchange='ragged_all_to_all' is not implemented by XLA:CPU"),
    ({"moe.impl": "pallas"}, "moe.impl='pallas' runs interpreted on cpu"),
    ({"sharding_rules": "batch_without_expert"}, "sharding_rules maps 'batch' to ('data', 'fsdp')"),
])
def test_config_errors(monkeypatch, override, message):
  monkeypatch.setattr(jax, "device_count", lambda: 8)  # validate sizes the mesh from the device count
  c = moe_configs.get_config("tiny")
  c.mesh.shape.data, c.mesh.shape.expert = 4, 2
  for key, value in override.items():
    if key == "sharding_rules":
      c.sharding_rules = [r if r[0] != "batch" else ["batch", ["data", "fsdp"]] for r in c.sharding_rules]
      continue
    section, name = key.rsplit(".", 1)
    node = c.mesh.shape if section == "mesh.shape" else c[section]
    if section == "mesh.shape":
      node[name] = value
    else:  # a fresh section: ConfigDict is type-safe, and wrong types are what some checks catch
      c[section] = ml_collections.ConfigDict({**node.to_dict(), name: value})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_default_moe_config_validates_with_expert_parallelism(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  c = moe_configs.get_config("tiny")
  c.mesh.shape.data, c.mesh.shape.expert = 2, 4
  config_lib.validate(c)
