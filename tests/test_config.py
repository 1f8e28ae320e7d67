"""validate(): every user mistake is one ConfigError line naming the key and the fix."""

import subprocess
import sys

import pytest

from configs import base
from efficientllm_jax.config import ConfigError, validate
from tests.conftest import ROOT, tiny_config

BAD = [
    ({"model.num_kv_heads": 3}, r"model.num_heads=4 is not divisible by model.num_kv_heads=3: .*\(1, 2, 4\)"),
    ({"model.hidden": 0}, r"model.hidden=0 must be a positive integer"),
    ({"model.num_layers": -2}, r"model.num_layers=-2 must be a positive integer"),
    ({"attention.kind": "flash"}, r"attention.kind='flash' is not known: use one of .*gqa"),
    ({"attention.impl": "triton"}, r"attention.impl='triton' is not known"),
    ({"position.kind": "rotary"}, r"position.kind='rotary' is not known"),
    ({"ffn.kind": "sparse"}, r"ffn.kind='sparse' is not known"),
    ({"model.remat": "some"}, r"model.remat='some' is not known: use one of none, full, dots"),
    ({"model.dtype": "fp8"}, r"model.dtype='fp8' is not known"),
    ({"attention.kind": "mqa"}, r"attention.kind='mqa' needs model.num_kv_heads=1"),
    ({"attention.kind": "mha"}, r"attention.kind='mha' needs model.num_kv_heads == model.num_heads=4"),
    ({"train.min_lr": 1.0}, r"train.min_lr=1.0 is above train.lr="),
    ({"train.lr": 0.0}, r"train.lr=0 trains nothing"),
    ({"train.b2": 1.0}, r"train.b2=1.0 must be in \[0, 1\)"),
    ({"train.steps": 0}, r"train.steps=0 must be a positive integer"),
    ({"train.logits_dtype": "fp16"}, r"train.logits_dtype='fp16' is not float32 or bfloat16: set --config"),
    ({"train.master_weights": True}, r"train.master_weights=True needs 16-bit parameters: set --config.model.param_dtype"),
    ({"data.seq_len": 0}, r"data.seq_len=0 must be a positive integer"),
    ({"data.eval_fraction": 0.0}, r"data.eval_fraction=0.0 must be in \(0, 1\)"),
    ({"data.tokenizer": "bpe", "data.bpe_vocab_size": 9000}, r"data.bpe_vocab_size=9000 exceeds model.vocab_size=512"),
    ({"position.rope_fraction": 0.28}, r"position.rope_fraction=0.28 rotates 9 of model.head_dim=32 dims"),
    ({"model.rms_eps": 0.0}, r"model.rms_eps=0 divides by zero"),
    ({"mesh.shape.data": 2}, r"mesh.shape .* needs 2 devices but 1 are present"),
    ({"mesh.distributed": "maybe"}, r"mesh.distributed='maybe' is not known: use one of auto, on, off"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_config_rejected_with_its_message(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate(tiny_config(**overrides))


@pytest.mark.parametrize("size", ["tiny", "0.5B", "1.5B", "3B"])
def test_presets_are_valid(size):
  validate(base.get_config(size))


def test_base_presets_match_qwen25_and_efficientllm_recipe():
  c = base.get_config("1.5B")
  assert (c.model.hidden, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.ffn_dim) == (
      1536, 28, 12, 2, 8960)
  assert c.model.vocab_size == 151936 and c.position.rope_theta == 1e6 and c.model.rms_eps == 1e-6
  assert (c.train.b1, c.train.b2, c.train.weight_decay, c.train.clip_norm) == (0.9, 0.95, 0.1, 1.0)
  assert (c.train.lr, c.train.min_lr, c.data.seq_len) == (1e-4, 1e-5, 8192)
  assert [base.get_config(s).train.micro_batch for s in ("0.5B", "1.5B", "3B")] == [4, 2, 1]


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_cli_bad_value_is_one_line_before_compiling(tmp_path):
  r = _launch("--config=configs/base.py:tiny", f"--workdir={tmp_path}/w", "--config.model.num_kv_heads=3")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: model.num_heads=4 is not divisible")
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_cli_unknown_key_is_rejected(tmp_path):
  r = _launch("--config=configs/base.py:tiny", f"--workdir={tmp_path}/w", "--config.train.stepz=5")
  assert r.returncode != 0
  assert "stepz" in r.stderr


def test_cli_unknown_preset_names_the_choices(tmp_path):
  r = _launch("--config=configs/base.py:2B", f"--workdir={tmp_path}/w")
  assert r.returncode != 0
  assert "unknown size preset '2B': use one of tiny, 0.5B, 1.5B, 3B" in r.stderr
