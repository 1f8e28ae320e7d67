"""Tables and plots from fixture workdirs: numbers in the right columns, nulls as n/a with the reason in the csv,
both summary.json schemas, failed runs, discovery order, loss-vs-time reconstruction."""

import csv
import io
import json
import re
import subprocess
import sys

from efficientllm_jax.bench import plots, runner, tables
from tests.conftest import ROOT

NVML = "NVML energy counter unavailable on this device"
# The metrics schema (efficientllm_jax/metrics/efficiency.py SUMMARY_KEYS) with hand-picked numbers.
NEW = {
    "size": "0.5B", "attention": "gqa", "position": "rope", "ffn": "dense", "steps": 30,
    "params": {"total": 494032768, "embedding": 136134656, "non_embedding": 357898112},
    "micro_batch": 4, "grad_accum": 1, "seq_len": 8192, "tokens_per_step": 32768, "devices": 1,
    "device_kind": "NVIDIA H200", "compile_s": 9.2, "AL_s": 0.4485, "tokens_per_s": 73062.4,
    "tokens_per_s_per_device": 73062.4, "TT": 1.4789e-4, "ST": 1.8e-8, "AMU_GB": 61.234, "peak_memory_GB": 70.5,
    "PCU": 0.987, "MFU": 0.4123, "AEC_W_per_device": None, "AEC_W_per_device_null_reason": NVML,
    "AEC_W_total": None, "AEC_W_total_null_reason": NVML, "J_per_token": None, "J_per_token_null_reason": NVML,
    "PPL": 123.45, "eval_loss": 4.8158, "final_loss": 4.9, "gpu_hours": 0.0125, "wall_s": 45.0, "status": "ok",
}
# The expected text cells for NEW, worked out by hand from the numbers above.
NEW_CELLS = {"params (total/active)": "494.0M", "micro-batch": "4", "seq": "8192", "AMU (GB)": "61.23",
             "peak mem (GB)": "70.50", "PCU %": "98.7", "MFU %": "41.2", "AL (s)": "0.4485",
             "TT (tok/param/s)": "1.479e-04", "ST (smp/param/s)": "1.800e-08", "tokens/s": "73,062",
             "AEC (W)": "n/a", "J/token": "n/a", "PPL": "123.45", "GPU-hours": "0.0125"}
MOE = {**NEW, "ffn": "moe", "params": {"total": 2_900_000_000, "embedding": 1, "non_embedding": 1,
                                       "active": 1_100_000_000},
       "AEC_W_total": 512.25, "AEC_W_per_device": [512.25], "J_per_token": 7.01e-3, "tokens_per_s": 1234.0}
for k in ("AEC_W_total_null_reason", "AEC_W_per_device_null_reason", "J_per_token_null_reason"):
  MOE.pop(k)
# The spine's first summary.json (train/loop.py before the metrics issue).
OLD = {"size": "tiny", "attention": "gqa", "position": "rope", "ffn": "dense", "steps": 12,
       "params": {"total": 459904, "embedding": 65536, "non_embedding": 394368}, "tokens_per_step": 256,
       "devices": 1, "device_kind": "cpu", "compile_s": 3.0, "step_time_s": 0.05, "tokens_per_s": 5120.0,
       "first_loss": 6.2, "final_loss": 3.1, "eval_loss": 3.5, "ppl": 33.12, "wall_s": 4.0}


def _workdir(root, sweep_dir, name, *, summary=None, label=None, config=None, failure=None):
  wd = root / sweep_dir / name
  wd.mkdir(parents=True)
  if summary is not None:
    (wd / "summary.json").write_text(json.dumps(summary))
  if label is not None:
    (wd / runner.VARIANT_FILE).write_text(json.dumps({"sweep": "attention", "name": name, "label": label,
                                                      "scale": "paper"}))
  if config is not None:
    (wd / "config.json").write_text(json.dumps(config))
  if failure is not None:
    (wd / runner.FAILURE_FILE).write_text(json.dumps({"returncode": 1, "reason": failure}))
  return wd


def _text_rows(text):
  """{method: {column: cell}} parsed back from the aligned text table (columns are 2+ spaces apart)."""
  lines = text.splitlines()
  head_i = next(i for i, l in enumerate(lines) if l.startswith("method"))
  header = re.split(r"\s{2,}", lines[head_i].strip())
  rows = {}
  for line in lines[head_i + 2:]:
    if not line.strip():
      break
    cells = re.split(r"\s{2,}", line.strip())
    assert len(cells) == len(header), line
    rows[cells[0]] = dict(zip(header, cells))
  return rows


def test_new_schema_numbers_land_in_their_columns(tmp_path):
  _workdir(tmp_path, "attention_results", "gqa_0.5B", summary=NEW, label="GQA 0.5B")
  _workdir(tmp_path, "attention_results", "mqa_0.5B", summary=MOE, label="MQA 0.5B")
  runs = tables.discover(tmp_path, "attention")
  paths = tables.write_tables("attention", runs, tmp_path)
  rows = _text_rows(paths["txt"].read_text())
  assert list(rows) == ["MQA 0.5B", "GQA 0.5B"]  # the sweep's order, not the directory listing's
  got = {k: v for k, v in rows["GQA 0.5B"].items() if k != "method"}
  assert got == NEW_CELLS
  moe = rows["MQA 0.5B"]
  assert (moe["params (total/active)"], moe["AEC (W)"], moe["J/token"], moe["tokens/s"]) == (
      "2.90B/1.10B", "512.2", "7.010e-03", "1,234")
  text = paths["txt"].read_text()
  assert f"n/a AEC (W), J/token (GQA 0.5B): {NVML}" in text
  assert "devices: 1 x NVIDIA H200; steps: 30" in text


def test_csv_keeps_numbers_and_null_reasons(tmp_path):
  _workdir(tmp_path, "attention_results", "gqa_0.5B", summary=NEW, label="GQA 0.5B")
  runs = tables.discover(tmp_path, "attention")
  rows = list(csv.DictReader(io.StringIO(tables.write_tables("attention", runs, tmp_path)["csv"].read_text())))
  assert len(rows) == 1
  r = rows[0]
  assert float(r["tokens_per_s"]) == 73062.4 and float(r["PCU"]) == 0.987 and float(r["AL_s"]) == 0.4485
  assert int(r["params_total"]) == 494032768 and r["status"] == "ok" and r["device_kind"] == "NVIDIA H200"
  assert r["AEC_W_total"] == "n/a" and r["AEC_W_total_null_reason"] == NVML
  assert r["J_per_token"] == "n/a" and r["J_per_token_null_reason"] == NVML
  assert r["params_active"] == "n/a" and "dense" in r["params_active_null_reason"]
  assert r["tokens_per_s_null_reason"] == ""


def test_markdown_table(tmp_path):
  _workdir(tmp_path, "moe_results", "dense_1.5B", summary=NEW, label="Dense 1.5B")
  md = tables.write_tables("moe", tables.discover(tmp_path, "moe"), tmp_path)["md"].read_text()
  lines = md.splitlines()
  header = next(l for l in lines if l.startswith("| method"))
  row = next(l for l in lines if l.startswith("| Dense 1.5B"))
  cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
  assert cells["tokens/s"] == "73,062" and cells["AEC (W)"] == "n/a" and cells["MFU %"] == "41.2"
  assert (tmp_path / "moe_table.txt").exists() and (tmp_path / "moe_table.csv").exists()


def test_old_spine_summary_is_read(tmp_path):
  _workdir(tmp_path, "positional_encoding_results", "rope_tiny", summary=OLD,
           config={"train": {"micro_batch": 4, "grad_accum": 1}, "data": {"seq_len": 64}})
  runs = tables.discover(tmp_path, "positional")
  paths = tables.write_tables("positional", runs, tmp_path)
  row = _text_rows(paths["txt"].read_text())["rope_tiny"]  # no bench_variant.json: the folder name
  assert (row["AL (s)"], row["PPL"], row["tokens/s"], row["micro-batch"], row["seq"]) == (
      "0.05", "33.12", "5,120", "4", "64")
  assert row["AMU (GB)"] == "n/a" and row["GPU-hours"] == "n/a"
  r = next(csv.DictReader(io.StringIO(paths["csv"].read_text())))
  assert r["AMU_GB"] == "n/a" and r["AMU_GB_null_reason"] == tables.OLD_SCHEMA


def test_failed_and_incomplete_runs_are_rows_with_reasons(tmp_path):
  _workdir(tmp_path, "attention_results", "mla_1.5B", label="MLA 1.5B",
           failure="error: attention.kind='mla' is not known")
  wd = _workdir(tmp_path, "attention_results", "nsa_1.5B", label="NSA 1.5B", config={"train": {}})
  # an older finished run under a newer failure: the failure is what the table shows (the latest attempt)
  _workdir(tmp_path, "attention_results", "gqa_1.5B", label="GQA 1.5B", summary=NEW, failure="killed by signal")
  runs = tables.discover(tmp_path, "attention")
  assert [(r.name, r.status) for r in runs] == [("gqa_1.5B", "failed"), ("mla_1.5B", "failed"),
                                                ("nsa_1.5B", "incomplete")]
  assert not runner.summary_done(wd) and not runner.summary_done(tmp_path / "attention_results" / "gqa_1.5B")
  paths = tables.write_tables("attention", runs, tmp_path)
  rows = _text_rows(paths["txt"].read_text())
  assert set(rows["MLA 1.5B [failed]"].values()) - {"MLA 1.5B [failed]"} == {"n/a"}
  assert "MLA 1.5B: failed: error: attention.kind='mla' is not known" in paths["txt"].read_text()
  r = {row["variant"]: row for row in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
  assert r["mla_1.5B"]["status"] == "failed"
  assert r["mla_1.5B"]["status_reason"] == "error: attention.kind='mla' is not known"
  assert r["mla_1.5B"]["PPL"] == "n/a" and r["mla_1.5B"]["PPL_null_reason"].startswith("failed: error:")
  assert r["nsa_1.5B"]["status"] == "incomplete"


def test_runs_for_variants_includes_not_run(tmp_path):
  from efficientllm_jax.bench import sweeps

  vs = sweeps.expand("moe", "smoke")
  runs = tables.runs_for(vs, tmp_path)
  assert [(r.label, r.status) for r in runs] == [("Dense tiny", "not run"), ("MoE tinyx8", "not run")]


def test_discover_filters_by_scale(tmp_path):
  _workdir(tmp_path, "attention_results", "gqa_0.5B", summary=NEW, label="GQA 0.5B")  # scale paper
  assert [r.name for r in tables.discover(tmp_path, "attention", scale="paper")] == ["gqa_0.5B"]
  assert tables.discover(tmp_path, "attention", scale="smoke") == []
  assert tables.discover(tmp_path, "moe") == []


def test_loss_curve_wall_time_from_step_times(tmp_path):
  rows = [{"step": 4, "split": "train", "loss": 5.0, "step_time": 0.5},
          {"step": 8, "split": "train", "loss": 4.0, "step_time": 0.25},
          {"step": 8, "split": "eval", "loss": 4.5, "ppl": 90.0},
          {"step": 12, "split": "train", "loss": 3.0, "step_time": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"torn")
  train, evals = plots.loss_curve(tmp_path)
  # step 1 is compilation: 3 steps x 0.5 s, then 4 x 0.25 s, then 4 x 1.0 s
  assert train == [(1.5, 5.0), (2.5, 4.0), (6.5, 3.0)]
  assert evals == [(2.5, 4.5)]


def test_plots_are_pngs(tmp_path):
  wd = _workdir(tmp_path, "moe_results", "dense_1.5B", summary=NEW, label="Dense 1.5B")
  (wd / "metrics.jsonl").write_text(json.dumps({"step": 4, "split": "train", "loss": 5.0, "step_time": 0.5}))
  _workdir(tmp_path, "moe_results", "moe_1.5Bx8", label="MoE 1.5Bx8", failure="boom")
  paths = plots.write_plots("moe", tables.discover(tmp_path, "moe"), tmp_path)
  assert [p.name for p in paths] == ["moe_metrics.png", "moe_loss.png"]
  for p in paths:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_tables_command_rebuilds_from_workdirs(tmp_path):
  _workdir(tmp_path, "attention_results", "gqa_0.5B", summary=NEW, label="GQA 0.5B")
  r = subprocess.run([sys.executable, "-m", "launch.bench", "tables", f"--results_dir={tmp_path}", "--noplots"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Attention mechanisms - EfficientLLM benchmark" in r.stdout
  assert _text_rows(r.stdout)["GQA 0.5B"]["tokens/s"] == "73,062"
  assert "positional: no workdirs" in r.stdout
  assert (tmp_path / "attention_mechanisms_table.csv").exists()
  assert not (tmp_path / "attention_mechanisms_metrics.png").exists()
