"""tools.import_hf: Qwen2 safetensors -> our parameters, checked against an independent numpy forward and against
logits that Hugging Face transformers itself produced (tests/fixtures/qwen2_tiny, made by make_qwen2_fixture.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import qwen2_reference as ref
from configs import hf as hf_config
from efficientllm_jax.models.transformer import Transformer
from efficientllm_jax.tools import convert, import_hf
from efficientllm_jax.tools.convert import ConversionError
from efficientllm_jax.train import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "qwen2_tiny"


def imported_logits(ckpt: Path, ids: np.ndarray, *, scan_layers: bool = True) -> np.ndarray:
  """Logits of our model with the weights `init.checkpoint=ckpt` loads (fp32), under one jit."""
  cfg = hf_config.get_config(str(ckpt))
  cfg.model.dtype, cfg.model.remat, cfg.model.scan_layers = "float32", "none", scan_layers
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), params)
  params = ckpt_lib.load_init_params(cfg, params)
  with jax.default_matmul_precision("highest"):  # true fp32 matmuls on GPUs too (no TF32)
    return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids))


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_imported_logits_match_the_numpy_qwen2(tmp_path, scan_layers):
  hf = ref.tiny_hf_config(rope_theta=1e6, num_hidden_layers=3)
  tensors = ref.random_qwen2_tensors(hf, seed=1)
  ref.write_hf_dir(tmp_path / "hf", hf, tensors)
  fields = import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
  assert fields["model"] == {"vocab_size": 512, "hidden": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                             "head_dim": 16, "ffn_dim": 96, "rms_eps": 1e-6, "qkv_bias": True,
                             "tie_embeddings": True}
  ids = np.random.default_rng(0).integers(0, 512, (2, 21))
  got = imported_logits(tmp_path / "ckpt", ids, scan_layers=scan_layers)
  assert rel_err(got, ref.qwen2_logits(tensors, hf, ids)) < 1e-5


def test_bf16_safetensors_and_sharded_files(tmp_path):
  """Qwen2.5 ships bf16 weights (numpy has no bf16: read from the raw layout) split over several files."""
  import ml_dtypes
  hf = ref.tiny_hf_config(num_hidden_layers=2)
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in ref.random_qwen2_tensors(hf, seed=2).items()}
  names = sorted(tensors)
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(hf))
  for i, part in enumerate((names[::2], names[1::2])):  # safetensors.numpy cannot write bf16: write it by hand
    _save_bf16({k: tensors[k] for k in part}, d / f"model-0000{i + 1}-of-00002.safetensors")
  got = convert.read_safetensors(d)
  assert sorted(got) == names
  for k in names:
    np.testing.assert_array_equal(got[k], tensors[k].astype(np.float32))
  import_hf.import_checkpoint(d, tmp_path / "ckpt")
  ids = np.arange(12)[None] * 37 % 512
  widened = {k: v.astype(np.float32) for k, v in tensors.items()}
  assert rel_err(imported_logits(tmp_path / "ckpt", ids), ref.qwen2_logits(widened, hf, ids)) < 1e-5


def _save_bf16(tensors: dict, path: Path) -> None:
  header, offset, blobs = {}, 0, []
  for k, v in tensors.items():
    b = np.ascontiguousarray(v).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
    offset += len(b)
    blobs.append(b)
  h = json.dumps(header).encode()
  h += b" " * (-len(h) % 8)
  path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_transformers_5_config_layout(tmp_path):
  """transformers 5 moved rope_theta into rope_parameters; the importer must read it from there."""
  hf = ref.tiny_hf_config(rope_theta=5e5)
  v5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
  v5 |= {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "layer_types": ["full_attention"] * 2}
  ref.write_hf_dir(tmp_path / "hf", v5, ref.random_qwen2_tensors(hf))
  assert import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")["position"]["rope_theta"] == 5e5


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"model_type='llama'; only Qwen2 / Qwen2.5"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=false .* is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, r"rope_scaling=.* is not implemented"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2}}, r"rope_parameters=.* is not implemented"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"per-layer windows"),
    ({"use_sliding_window": True}, r"use_sliding_window=true"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"num_hidden_layers": 3}, r"no tensor 'model.layers.2.input_layernorm.weight'"),
    ({"vocab_size": 256}, r"model.embed_tokens.weight has shape \(512, 64\), config.json says \(256, 64\)"),
])
def test_unsupported_or_inconsistent_checkpoints(tmp_path, change, message):
  hf = ref.tiny_hf_config()
  tensors = ref.random_qwen2_tensors(hf)
  ref.write_hf_dir(tmp_path / "hf", {**hf, **change}, tensors)
  with pytest.raises(ConversionError, match=message) as e:
    import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
  assert "\n" not in str(e.value) and not (tmp_path / "ckpt").exists()


def test_import_refuses_to_overwrite_and_init_checks_the_model_shape(tmp_path):
  hf = ref.tiny_hf_config()
  ref.write_hf_dir(tmp_path / "hf", hf, ref.random_qwen2_tensors(hf))
  import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
  with pytest.raises(ConversionError, match=r"already exists: pass --overwrite"):
    import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
  import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", overwrite=True)
  from configs import base
  cfg = base.get_config("tiny")
  cfg.init.checkpoint = str(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"does not fit the config: model.ffn_dim=384 \(checkpoint: 96\); "
                                                     r"use --config=configs/hf.py:"):
    ckpt_lib.load_init_params(cfg, None)
  cfg.init.checkpoint = str(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"is not a directory written by .*import_hf"):
    ckpt_lib.load_init_params(cfg, None)


def test_parquet_prepare_then_training_from_the_imported_weights(tmp_path):
  """The prepare -> train round trip on parquet, from imported weights (--config=configs/hf.py:CKPT): the first
  step's loss is the numpy Qwen2's loss on the first batch. (The jsonl round trip is test_checkpoint's kill test.)"""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from efficientllm_jax.data import pipeline, prepare
  from efficientllm_jax.train import loop
  hf = ref.tiny_hf_config(vocab_size=320)
  tensors = ref.random_qwen2_tensors(hf, seed=3)
  ref.write_hf_dir(tmp_path / "hf", hf, tensors)
  import_hf.import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
  texts = [f"document {i}: the imported model reads bytes here. " * (1 + i % 5) for i in range(200)]
  pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet", row_group_size=50)
  prepare.prepare([str(tmp_path / "a.parquet")], tmp_path / "data",
                  prepare.Options("bytes", 16, field="body", eval_fraction=0.1), stream=io.StringIO())
  cfg = hf_config.get_config(str(tmp_path / "ckpt"))
  cfg.data.path, cfg.data.seq_len = str(tmp_path / "data"), 16
  cfg.model.dtype, cfg.model.remat = "float32", "none"
  cfg.train.steps, cfg.train.micro_batch, cfg.train.eval_batches, cfg.train.log_every = 1, 2, 1, 1
  cfg.checkpoint.every = 0
  with jax.default_matmul_precision("highest"):
    summary = loop.train_and_evaluate(cfg, tmp_path / "run")
  assert str(tmp_path / "data") in json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"]
  # The first step's loss, recomputed with the numpy reference on the same batch.
  batch = next(pipeline.train_iterator(pipeline.make_splits(cfg).train, cfg))
  x, y = batch["inputs"][0], batch["targets"][0]
  logits = ref.qwen2_logits(tensors, hf, x)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = float(np.mean(lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]))
  assert abs(summary["first_loss"] - want) < 1e-4 * abs(want)


def test_cli(tmp_path):
  hf = ref.tiny_hf_config()
  ref.write_hf_dir(tmp_path / "hf", hf, ref.random_qwen2_tensors(hf))
  (tmp_path / "hf" / "tokenizer.json").write_text("{}")
  cmd = [sys.executable, "-m", "efficientllm_jax.tools.import_hf", f"--hf_dir={tmp_path / 'hf'}",
         f"--out={tmp_path / 'ckpt'}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"train from it: python -m launch --config=configs/hf.py:{tmp_path / 'ckpt'}" in r.stdout
  assert (tmp_path / "ckpt" / "tokenizer.json").is_file() and (tmp_path / "ckpt" / "hf_config.json").is_file()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --out=")


def test_transformers_fixture_logits(tmp_path):
  """Logits Hugging Face transformers computed for a random tiny Qwen2 (fp32); the importer must reproduce them.

  The fixture is generated once on a machine with torch + transformers:
    python tests/fixtures/make_qwen2_fixture.py   (writes tests/fixtures/qwen2_tiny/)
  A missing fixture fails this test on purpose: it must be committed."""
  assert FIXTURE.is_dir(), (f"{FIXTURE} is missing: run `python tests/fixtures/make_qwen2_fixture.py` where torch "
                            "and transformers are installed, and commit the result")
  hf = json.loads((FIXTURE / "config.json").read_text())
  ids, want = np.load(FIXTURE / "input_ids.npy"), np.load(FIXTURE / "logits.npy").astype(np.float64)
  tensors = convert.read_safetensors(FIXTURE)
  # The numpy reference agrees with transformers (so the other tests' reference is the real thing) ...
  assert rel_err(ref.qwen2_logits(tensors, hf, ids), want) < 1e-4
  # ... and so does the imported model.
  import_hf.import_checkpoint(FIXTURE, tmp_path / "ckpt")
  assert rel_err(imported_logits(tmp_path / "ckpt", ids), want) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Qwen2.5-0.5B-sized parity runs on a GPU machine")
def test_qwen25_05b_parity_with_transformers():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  r = subprocess.run([sys.executable, "benchmarks/hf_parity_0_5b.py"], cwd=ROOT, capture_output=True, text=True,
                     timeout=1800)
  assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
