"""`python -m launch` end to end on the tiny model: files in the workdir, console progress."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_launch_tiny_end_to_end(tmp_path):
  wd = tmp_path / "w"
  r = subprocess.run(
      [sys.executable, "-m", "launch", "--config=configs/base.py:tiny", f"--workdir={wd}",
       "--config.train.steps=12", "--config.train.log_every=4", "--config.train.eval_every=0",
       "--config.data.tokenizer=bytes", "--config.data.max_corpus_mb=1", "--config.data.seq_len=64"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  assert any(l.startswith("step  4/12 | loss") and "tok/s" in l for l in lines)
  done = [l for l in lines if l.startswith("done: loss")]
  assert len(done) == 1 and "tok/s" in done[0] and "PPL" in done[0]
  assert any(l.startswith("  null ") and "AEC" in l for l in lines)  # CPU: no NVML, said with the reason
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["train"]["steps"] == 12 and cfg["model"]["hidden"] == 128
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [4, 8, 12]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 12 and summary["tokens_per_s"] > 0
  assert list((wd / "tb").glob("events.out.tfevents.*"))
