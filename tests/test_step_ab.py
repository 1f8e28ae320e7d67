"""benchmarks/step_ab.py: interleaved rounds per variant, the table's numbers from them, config errors first."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ab.py"


def _module():
  spec = importlib.util.spec_from_file_location("step_ab", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_rounds_interleave_and_rows_follow_them(monkeypatch, tmp_path, capsys):
  """Two stand-in variants whose steps take 4 and 12 ms (no compile): the rounds alternate their order, every
  variant gets each round, and the rows' median / min / ratio / tokens per second come from those rounds."""
  ab = _module()
  order = []

  def fake_build(args, variant):
    delay = 0.012 if variant else 0.004

    def step(state, batch):
      order.append(variant)
      time.sleep(delay)
      return state + 1, {"loss": jnp.float32(2.0)}

    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch=2, grad_accum=1), data=SimpleNamespace(seq_len=64))
    return {"name": variant or "(shared config)", "cfg": cfg, "step": step, "state": jnp.zeros(()),
            "batches": [None, None], "ms": [], "power_W": [], "energy_J_per_step": [], "compile_s": 0.0,
            "loss_first": 2.0}

  monkeypatch.setattr(ab, "build_variant", fake_build)
  out = tmp_path / "ab.json"
  monkeypatch.setattr(sys, "argv", ["step_ab.py", "--config=configs/base.py:tiny", "--variant=",
                                    "--variant=model.remat=full", "--rounds=3", "--steps=2", f"--json={out}"])
  ab.main()
  assert order == [""] * 2 + ["model.remat=full"] * 4 + [""] * 4 + ["model.remat=full"] * 2  # A B | B A | A B
  import json
  rows = json.loads(out.read_text())
  fast, slow = rows
  for r, ms in ((fast, 4), (slow, 12)):
    assert len(r["rounds_ms"]) == 3 and min(r["rounds_ms"]) >= ms
    assert r["median_ms"] == pytest.approx(sorted(r["rounds_ms"])[1]) and r["min_ms"] == min(r["rounds_ms"])
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["median_ms"] * 1e3)
    assert r["power_W"] is None and r["loss_last"] == 2.0  # no NVML on CPU: n/a, not a number
  assert fast["vs_first"] == 1.0 and slow["vs_first"] == pytest.approx(fast["median_ms"] / slow["median_ms"])
  assert slow["vs_first"] < 0.6
  assert "| model.remat=full |" in capsys.readouterr().out


def test_bad_variant_stops_before_compiling():
  p = subprocess.run([sys.executable, str(SCRIPT), "--config=configs/base.py:tiny", "--variant=",
                      "--variant=model.remat=foo"], capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[1])
  assert p.returncode != 0
  assert "--variant='model.remat=foo': model.remat='foo' is not known: use one of" in p.stderr
  assert "compiled" not in p.stdout
