"""A two-variant smoke sweep end to end: `python -m launch.bench moe --scale=smoke` over stand-in config files
(written here into tmp_path; both are configs/base.py:tiny variants) trains two real tiny models, prints the
table, writes .txt/.md/.csv and PNGs, and a second call resumes (skips both)."""

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

STANDIN = """from configs import base

def get_config(arg="tiny"):
  c = base.get_config(arg)
  c.attention.kind, c.model.num_kv_heads = {kind!r}, {kv}
  return c
"""


def _bench(*args):
  return subprocess.run([sys.executable, "-m", "launch.bench", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=400)


@pytest.mark.slow
def test_two_variant_smoke_sweep(tmp_path):
  cfg = tmp_path / "configs" / "moe"
  cfg.mkdir(parents=True)
  (cfg / "dense.py").write_text(STANDIN.format(kind="gqa", kv=2))
  (cfg / "moe.py").write_text(STANDIN.format(kind="mqa", kv=1))
  res = tmp_path / "res"
  args = ["moe", "--scale=smoke", f"--configs_root={tmp_path / 'configs'}", f"--results_dir={res}",
          "--config.train.steps=8", "--config.data.seq_len=64", "--config.data.max_corpus_mb=0.5"]
  r = _bench(*args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = r.stdout
  assert "[1/2] moe/dense_tiny: done in " in out and "[2/2] moe/moe_tiny: done in " in out
  assert "bench: 2 ran, 0 skipped, 0 failed" in out and "MoE vs dense - EfficientLLM benchmark" in out

  summaries = {n: json.loads((res / "moe_results" / n / "summary.json").read_text()) for n in ("dense_tiny",
                                                                                              "moe_tiny")}
  assert all(s["steps"] == 8 for s in summaries.values())
  # MQA drops one of the two K/V heads: per layer K and V lose hidden x head_dim weights + head_dim biases each
  assert summaries["dense_tiny"]["params"]["total"] - summaries["moe_tiny"]["params"]["total"] == 2 * 2 * (
      128 * 32 + 32)
  rows = {row["variant"]: row for row in csv.DictReader((res / "moe_table.csv").open())}
  for n, s in summaries.items():
    assert rows[n]["status"] == "ok" and float(rows[n]["tokens_per_s"]) == s["tokens_per_s"]
    assert int(rows[n]["seq_len"]) == 64
  table = (res / "moe_table.txt").read_text()
  assert table in out  # printed as written
  assert "Dense tiny" in table and "MoE tinyx8" in table
  for png in ("moe_metrics.png", "moe_loss.png"):
    assert (res / png).read_bytes()[:4] == b"\x89PNG"

  r = _bench(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[1/2] moe/dense_tiny: skipped" in r.stdout and "bench: 0 ran, 2 skipped, 0 failed" in r.stdout
