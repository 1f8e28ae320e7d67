"""benchmarks/step_ab.py: interleaved rounds per variant, the table's numbers from them, config errors first."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ab.py"


def run(*args, timeout=300):
  return subprocess.run([sys.executable, str(SCRIPT), "--config=configs/base.py:tiny", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=SCRIPT.parents[1])


def test_rounds_and_rows(tmp_path):
  out = tmp_path / "ab.json"
  p = run("--set=train.micro_batch=2", "--set=data.seq_len=64", "--variant=", "--variant=model.remat=full",
          "--rounds=2", "--steps=1", "--warmup=0", f"--json={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [r["name"] for r in rows] == ["(shared config)", "model.remat=full"]
  for r in rows:
    assert len(r["rounds_ms"]) == 2 and all(t > 0 for t in r["rounds_ms"])
    assert r["median_ms"] == pytest.approx(sum(r["rounds_ms"]) / 2) and r["min_ms"] == min(r["rounds_ms"])
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["median_ms"] * 1e3)
    assert r["power_W"] is None  # no NVML on CPU: n/a, not a number
  assert rows[0]["vs_first"] == 1.0
  assert rows[1]["vs_first"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
  assert "| model.remat=full |" in p.stdout and p.stdout.count("round ") == 2


def test_bad_variant_stops_before_compiling():
  p = run("--variant=", "--variant=model.remat=foo", timeout=60)
  assert p.returncode != 0
  assert "--variant='model.remat=foo': model.remat='foo' is not known: use one of" in p.stderr
  assert "compiled" not in p.stdout
