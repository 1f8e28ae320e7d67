"""Sweep expansion: the EfficientLLM grids (counts, config files, micro-batches, context), overrides, validity.

test_every_variant_config_is_valid loads the real configs/attention|positional|moe files, which come from the
attention / positional / MoE branches: it fails until those are merged.
"""

import pytest

from efficientllm_jax.bench import sweeps
from efficientllm_jax.config import validate

# The paper's grids written out by hand (EfficientLLM / the original suite's README).
ATTENTION_PAPER = {
    "mqa_0.5B": ("configs/attention/mqa.py:0.5B", 4), "gqa_0.5B": ("configs/attention/gqa.py:0.5B", 4),
    "mla_0.5B": ("configs/attention/mla.py:0.5B", 4), "nsa_0.5B": ("configs/attention/nsa.py:0.5B", 4),
    "mqa_1.5B": ("configs/attention/mqa.py:1.5B", 2), "gqa_1.5B": ("configs/attention/gqa.py:1.5B", 2),
    "mla_1.5B": ("configs/attention/mla.py:1.5B", 2), "nsa_1.5B": ("configs/attention/nsa.py:1.5B", 2),
    "mqa_3B": ("configs/attention/mqa.py:3B", 1), "gqa_3B": ("configs/attention/gqa.py:3B", 1),
    "mla_3B": ("configs/attention/mla.py:3B", 1), "nsa_3B": ("configs/attention/nsa.py:3B", 1),
}
POSITIONAL_PAPER = [f"configs/positional/{k}.py:1.5B"
                    for k in ("rope", "sinusoidal", "learned", "relative", "none", "alibi")]
MOE_PAPER = ["configs/moe/dense.py:1.5B", "configs/moe/dense.py:3B", "configs/moe/moe.py:0.5Bx8",
             "configs/moe/moe.py:1.5Bx8"]


@pytest.mark.parametrize("sweep,paper,smoke", [("attention", 12, 4), ("positional", 6, 6), ("moe", 4, 2),
                                               ("all", 22, 12)])
def test_counts(sweep, paper, smoke):
  assert len(sweeps.expand(sweep, "paper")) == paper
  assert len(sweeps.expand(sweep, "smoke")) == smoke
  names = [(v.sweep, v.name) for v in sweeps.expand(sweep, "paper")]
  assert len(set(names)) == len(names)


def test_attention_paper_grid():
  got = {v.name: (v.config, int(dict(v.overrides)["train.micro_batch"])) for v in sweeps.expand("attention", "paper")}
  assert got == ATTENTION_PAPER


def test_positional_paper_is_1p5b_at_8k():
  vs = sweeps.expand("positional", "paper")
  assert [v.config for v in vs] == POSITIONAL_PAPER
  for v in vs:
    assert dict(v.overrides)["data.seq_len"] == "8192" and dict(v.overrides)["train.micro_batch"] == "2"


def test_moe_paper_and_smoke():
  assert [v.config for v in sweeps.expand("moe", "paper")] == MOE_PAPER
  assert [v.config for v in sweeps.expand("moe", "smoke")] == ["configs/moe/dense.py:tiny", "configs/moe/moe.py:tiny"]


def test_smoke_is_tiny_and_short():
  for v in sweeps.expand("all", "smoke"):
    assert v.config.endswith(":tiny")
    o = dict(v.overrides)
    assert int(o["train.steps"]) <= 30 and int(o["data.seq_len"]) <= 128 and o["data.tokenizer"] == "bytes"
    assert o["checkpoint.every"] == "0"  # never resumed: no final save


def test_smoke_env_points_the_compile_cache_under_the_data_cache(tmp_path):
  env = sweeps.smoke_env(tmp_path)
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jax_compile")
  assert float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) > 0


def test_steps_and_overrides_apply_once_user_last():
  vs = sweeps.expand("attention", "smoke", steps=7, overrides=[("train.steps", "9"), ("train.lr", "0.01")])
  for v in vs:
    args = v.config_args()
    assert args[0] == f"--config={v.config}"  # config_flags refuses overrides before --config
    steps = [a for a in args if a.startswith("--config.train.steps=")]
    assert steps == ["--config.train.steps=9"]
    assert "--config.train.lr=0.01" in args


def test_steps_flag_alone_sets_steps():
  v = sweeps.expand("moe", "paper", steps=30)[0]
  assert dict(v.overrides)["train.steps"] == "30"


def test_configs_root_and_workdir(tmp_path):
  v = sweeps.expand("positional", "smoke", configs_root="/x/cfg")[0]
  assert v.config == "/x/cfg/positional/rope.py:tiny"
  assert v.workdir(tmp_path) == tmp_path / "positional_encoding_results" / "rope_tiny"
  assert sweeps.expand("moe", "paper")[2].workdir("r") == sweeps.Path("r/moe_results/moe_0.5Bx8")


def test_unknown_names_rejected():
  with pytest.raises(ValueError, match="unknown sweep 'attn': use one of attention, positional, moe, all"):
    sweeps.expand("attn", "paper")
  with pytest.raises(ValueError, match="unknown scale 'huge'"):
    sweeps.expand("moe", "huge")
  with pytest.raises(ValueError, match="--only names unknown variant.*mqa_7B"):
    sweeps.select(sweeps.expand("attention", "paper"), ["mqa_7B"])
  assert [v.name for v in sweeps.select(sweeps.expand("attention", "paper"), ["gqa_3B", "mqa_0.5B"])] == [
      "mqa_0.5B", "gqa_3B"]


def test_token_budget_sets_steps_from_each_batch(tmp_path):
  # configs/base.py presets (on every branch): 0.5B is 4 x 8192 tokens/step, tiny here 4 x 64.
  vs = [sweeps.Variant("attention", "a", "A", "configs/base.py:0.5B"),
        sweeps.Variant("attention", "b", "B", "configs/base.py:tiny", (("data.seq_len", "64"),
                                                                      ("train.micro_batch", "4")))]
  out = sweeps.with_token_budget(vs, 100_000)
  assert dict(out[0].overrides)["train.steps"] == str(-(-100_000 // 32768))  # 4
  assert dict(out[1].overrides)["train.steps"] == str(-(-100_000 // 256))  # 391


def test_load_config_applies_overrides_like_launch():
  v = sweeps.Variant("moe", "x", "X", "configs/base.py:1.5B", (("train.steps", "30"), ("model.qkv_bias", "False")))
  c = sweeps.load_config(v)
  assert (c.model.hidden, c.model.num_layers, c.train.steps, c.model.qkv_bias) == (1536, 28, 30, False)


@pytest.mark.parametrize("variant", sweeps.expand("all", "paper") + sweeps.expand("all", "smoke"),
                         ids=lambda v: f"{v.scale}-{v.sweep}-{v.name}")
def test_every_variant_config_is_valid(variant):
  """Needs the merged attention / positional / MoE config files (fails on the bench branch alone)."""
  cfg = sweeps.load_config(variant)
  validate(cfg)
  o = dict(variant.overrides)
  if "train.micro_batch" in o:
    assert cfg.train.micro_batch == int(o["train.micro_batch"])
  kind = variant.name.split("_")[0]
  if variant.sweep == "attention":
    assert cfg.attention.kind == kind
  elif variant.sweep == "positional":
    assert cfg.position.kind == kind and (variant.scale == "smoke" or cfg.data.seq_len == 8192)
  else:
    assert cfg.ffn.kind == kind


def test_per_device_batches_multiply_the_studys_per_gpu_micro_batch():
  variants = sweeps.expand("attention", "paper")
  four = {v.name: dict(v.overrides)["train.micro_batch"] for v in sweeps.per_device_batches(variants, 4)}
  assert (four["gqa_0.5B"], four["gqa_1.5B"], four["gqa_3B"]) == ("16", "8", "4")  # 4 / 2 / 1 per GPU x 4
  moe = {v.name: dict(v.overrides)["train.micro_batch"]
         for v in sweeps.per_device_batches(sweeps.expand("moe", "paper"), 2)}
  assert moe["moe_1.5Bx8"] == "4"  # the preset's 2 (no override in the sweep) x 2
  assert sweeps.per_device_batches(variants, 1) == variants
