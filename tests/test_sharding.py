"""Sharded training on 8 simulated CPU devices equals the single-device run; parameters follow the rules; the
attention kernels run per device on a mesh."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from efficientllm_jax.parallel import sharding as sh
from tests.conftest import ROOT, tiny_config


def _cpu_devices_env(n: int) -> dict:
  """This process's environment (XLA flags included) with `n` simulated CPU devices."""
  flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _run_meshes(names, overrides=None):
  env = _cpu_devices_env(8)
  r = subprocess.run([sys.executable, "-m", "tests.multidevice_check", ",".join(names), json.dumps(overrides or {})],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dense_runs():
  return _run_meshes(["single", "dp8", "fsdp8", "dp2_fsdp2_tp2"])


# Every test using `dense_runs` (one 8-device subprocess) carries this mark: `--dist loadgroup` then keeps them on
# one xdist worker, so the module fixture runs once, not once per worker (tests/conftest.py fails them otherwise).
_DENSE = pytest.mark.xdist_group("sharding_dense")


@_DENSE
@pytest.mark.parametrize("mesh", ["dp8", "fsdp8", "dp2_fsdp2_tp2"])
def test_loss_after_3_steps_equals_single_device(dense_runs, mesh):
  np.testing.assert_allclose(dense_runs[mesh]["losses"], dense_runs["single"]["losses"], rtol=2e-5)
  assert dense_runs[mesh]["devices"] == 8


@_DENSE
def test_parameters_carry_the_rule_shardings(dense_runs):
  specs = dense_runs["dp2_fsdp2_tp2"]["specs"]
  q = next(v for k, v in specs.items() if "attn" in k and "'q'" in k and "kernel" in k)
  down = next(v for k, v in specs.items() if "'down'" in k and "kernel" in k)
  emb = next(v for k, v in specs.items() if "embedding" in k)
  assert q == [None, "fsdp", "tensor", None]  # [layers, embed, heads, head_dim]
  assert down == [None, "tensor", "fsdp"]  # [layers, mlp, embed]
  assert emb == ["tensor", "fsdp"]  # [vocab, embed]
  fsdp = dense_runs["fsdp8"]["specs"]
  assert next(v for k, v in fsdp.items() if "'down'" in k and "kernel" in k) == [None, None, "fsdp"]
  assert all(all(a is None for a in v) for v in dense_runs["dp8"]["specs"].values())  # dp: replicated


class _Mesh:
  shape = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_indivisible_dimension_is_replicated_not_an_error():
  rules = dict(sh.DEFAULT_RULES)
  # MQA: one K/V head cannot be split over tensor=2, so that dimension stays whole.
  assert sh.logical_to_spec(("embed", "kv_heads", "head_dim"), (128, 1, 32), _Mesh, rules) == sh.P("fsdp", None, None)
  assert sh.logical_to_spec(("embed", "heads", "head_dim"), (128, 4, 32), _Mesh, rules) == sh.P("fsdp", "tensor", None)


@pytest.mark.parametrize("shape,message", [
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 3}, "needs 3 devices but 8 are present"),
    ({"data": -1, "fsdp": 3}, "does not divide the 8 devices"),
])
def test_bad_mesh_shapes_name_the_fix(shape, message):
  with pytest.raises(ValueError, match=message):
    sh.mesh_shape(shape, 8)


def test_mesh_fills_the_free_axis():
  assert sh.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)


@pytest.mark.xdist_group("sharding_moe")
def test_moe_with_expert_parallelism_equals_single_device():
  # fsdp4 x ep2: experts split over `expert`, their embed dimension over `fsdp`; the dispatch is the shard_map
  # all-to-all (models/moe_ep.py; tests/ep_check.py compares its layer with one device on more meshes).
  runs = _run_meshes(["single", "fsdp4_ep2"], {"ffn.kind": "moe", "moe.expert_dim": 64,
                                               "moe.expert_parallel": "shard_map"})
  np.testing.assert_allclose(runs["fsdp4_ep2"]["losses"], runs["single"]["losses"], rtol=2e-5)
  specs = runs["fsdp4_ep2"]["specs"]
  assert next(v for k, v in specs.items() if "'experts'" in k and "'gate'" in k) == [None, "expert", "fsdp", None]
  assert next(v for k, v in specs.items() if "'experts'" in k and "'down'" in k) == [None, "expert", None, "fsdp"]


@_DENSE
def test_two_processes_feeding_their_own_rows_equal_one_process(dense_runs, tmp_path):
  """Multi-host batch assembly: 2 processes x 2 CPU devices on jax.distributed, each passing only its rows to
  step.global_batch, train exactly as one process given the whole batch; only process 0 writes metrics."""
  import portpicker
  port = portpicker.pick_unused_port()
  env = _cpu_devices_env(2)
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_check", str(port), str(i), str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  got = json.loads(outs[0][0].strip().splitlines()[-1])
  assert (got["processes"], got["devices"], got["batch_shape"]) == (2, 4, [1, 8, 64])
  # The reference: multidevice_check.run("single", {}), the same fixed batches, whole, on one device.
  np.testing.assert_allclose(got["losses"], dense_runs["single"]["losses"], rtol=2e-5)
  assert got["eval_first_rows"] == [0, 2, 4, 6]  # process 0's eval rows: every 2nd row of the micro-batch
  assert (tmp_path / "w0" / "metrics.jsonl").read_text().count("\n") == 1
  assert not (tmp_path / "w1" / "metrics.jsonl").exists() and not (tmp_path / "w1" / "tb").exists()


def test_attention_kernels_run_per_device_on_a_mesh():
  """ops.per_shard (4 simulated CPU devices, tests/kernel_mesh_check.py): a kernel sees its device's rows and
  heads, GQA groups intact; on a data=2 x tensor=2 mesh the Pallas flash kernel with a step bias (whose
  coefficients split with the heads and get their gradient summed over the batch shards) equals the unsharded
  call in values and gradients, and the NSA kernels see and return the right shapes; the compiled Mosaic kernels
  lower for CUDA inside the shard_map, backward included, and the remat policy still keeps their residuals; the
  loss with train.loss_impl=pallas matches impl=xla on a data=2 mesh (loss and both gradients)."""
  r = subprocess.run([sys.executable, "-m", "tests.kernel_mesh_check"], cwd=ROOT, env=_cpu_devices_env(4),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["dp2_tp2"] == [[[2, 128, 2, 64], [2, 128, 1, 64]]]  # batch 4 over data=2, heads 4/2 over tensor=2
  assert out["fsdp4"] == [[[1, 128, 4, 64], [1, 128, 2, 64]]]  # batch over fsdp too
  assert out["mqa_tp2"] == [[[1, 128, 4, 64], [1, 128, 1, 64]]]  # one K/V head: heads whole, batch still split
  assert out["odd_batch"] == [[[3, 128, 4, 64], [3, 128, 2, 64]]]  # 3 rows do not split over 2: run whole
  errors, spec = out["values"]["pallas_t5"]
  assert max(errors) < 1e-5 and spec == "P('data', None, 'tensor', None)", (errors, spec)
  assert len(out["values"]["pallas_t5"][0]) == 5  # the output and 4 gradients (q, k, v, bias coefficients)
  nc = 7  # compressed blocks of 16 every 8 over 64 tokens
  assert out["values"]["nsa_shapes"] == dict(  # batch 4 over data=2; 4 query / 2 K/V heads over tensor=2
      inside=[[[2, 64, 2, 16], [2, nc, 1, 16], [2, nc, 1, 16], [2, 64, 1, 16], [2, 64, 1, 16]]],
      outputs=[[4, 64, 4, 16], [4, 64, 4, 16], [4, 2, 64, 4]])  # o_cmp, o_slc [B, T, H, D]; ids [B, K, T, n]
  # the kernels run inside shard_maps (forward, backward); remat dots_attention keeps the forward's residuals, so
  # the forward kernel runs once (under remat full it runs twice), then d 64's fused backward
  assert out["lowered"] == dict(kernels=dict(dkv=1, forward=1), manual=2), out["lowered"]
  assert len(out["loss_kernel"]) == 3 and max(out["loss_kernel"]) < 1e-5, out["loss_kernel"]  # loss, dh, dtable
