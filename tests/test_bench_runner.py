"""The runner with a stand-in launcher (a tiny script): resume, --force, failures recorded and the sweep going on,
timeouts, progress lines; and the failure-reason rules."""

import json
import os
import signal
import sys
import textwrap
import time

import pytest

from efficientllm_jax.bench import runner, tables
from efficientllm_jax.bench.sweeps import Variant

FAKE_LAUNCH = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    wd = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--workdir=")))
    mode = next((a.split("=", 1)[1] for a in args if a.startswith("--config.fake.mode=")), "ok")
    wd.mkdir(parents=True, exist_ok=True)
    calls = json.loads((wd / "calls.json").read_text()) if (wd / "calls.json").exists() else []
    (wd / "calls.json").write_text(json.dumps(calls + [args]))
    (wd / "pid").write_text(str(os.getpid()))
    (wd / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("BENCH_A", "BENCH_B")}))
    if mode == "ok":
      print("step 1/1 | loss 1.0", flush=True)
      (wd / "summary.json").write_text(json.dumps({"status": "ok", "final_loss": 1.25, "PPL": 3.5,
                                                   "tokens_per_s": 1000.0, "AL_s": 0.5, "params": {"total": 10}}))
    elif mode == "fail":
      print("Traceback (most recent call last):", file=sys.stderr)
      print('  File "x.py", line 1, in <module>', file=sys.stderr)
      print("ValueError: boom at step 3", file=sys.stderr)
      print("I1127 12:00:00.000 123 atexit.py:10] shutting down", file=sys.stderr)
      sys.exit(1)
    elif mode == "hang":
      time.sleep(120)
    elif mode == "quiet":
      sys.exit(0)
""")


@pytest.fixture
def launcher(tmp_path):
  path = tmp_path / "fake_launch.py"
  path.write_text(FAKE_LAUNCH)
  return (sys.executable, str(path))


def _v(name, mode="ok"):
  return Variant("attention", name, name.upper(), "configs/base.py:tiny", (("fake.mode", mode),), "smoke")


def _calls(results, name):
  return json.loads((results / "attention_results" / name / "calls.json").read_text())


def test_resume_skips_finished_and_force_reruns_with_overwrite(tmp_path, launcher):
  res = tmp_path / "res"
  lines = []
  out = runner.run_variants([_v("a"), _v("b")], res, launch_cmd=launcher, say=lines.append)
  assert [o.status for o in out] == ["ok", "ok"]
  assert lines[0] == "[1/2] attention/a: running A (configs/base.py:tiny)"
  assert lines[1].startswith("[1/2] attention/a: done in ") and "final loss 1.2500 | PPL 3.50 | 1,000 tok/s" in lines[1]
  assert lines[-1].startswith("bench: 2 ran, 0 skipped, 0 failed in ")

  lines.clear()
  out = runner.run_variants([_v("a"), _v("b")], res, launch_cmd=launcher, say=lines.append)
  assert [o.status for o in out] == ["skipped", "skipped"]
  assert lines[0].startswith("[1/2] attention/a: skipped, ") and lines[0].endswith("(--force reruns it)")
  assert len(_calls(res, "a")) == 1

  out = runner.run_variants([_v("a"), _v("b")], res, launch_cmd=launcher, force=True, say=lines.append)
  assert [o.status for o in out] == ["ok", "ok"]
  calls = _calls(res, "a")
  assert len(calls) == 2 and all("--overwrite" in c for c in calls)
  assert calls[1][0] == "--config=configs/base.py:tiny" and f"--workdir={res}/attention_results/a" in calls[1]
  meta = json.loads((res / "attention_results" / "a" / runner.VARIANT_FILE).read_text())
  assert meta["label"] == "A" and meta["scale"] == "smoke" and meta["command"][-1] == "--overwrite"
  assert (res / "attention_results" / "a" / runner.STDOUT_LOG).read_text() == "step 1/1 | loss 1.0\n"


def test_failure_is_recorded_and_the_sweep_goes_on(tmp_path, launcher):
  res = tmp_path / "res"
  lines = []
  out = runner.run_variants([_v("bad", "fail"), _v("good")], res, launch_cmd=launcher, say=lines.append)
  assert [(o.status, o.reason) for o in out] == [("failed", "ValueError: boom at step 3"), ("ok", "")]
  assert any(l.startswith("[1/2] attention/bad: FAILED in ") and "ValueError: boom at step 3" in l for l in lines)
  assert lines[-1].startswith("bench: 1 ran, 0 skipped, 1 failed")
  wd = res / "attention_results" / "bad"
  rec = json.loads((wd / runner.FAILURE_FILE).read_text())
  assert rec["returncode"] == 1 and rec["reason"] == "ValueError: boom at step 3"
  assert "Traceback" in (wd / runner.STDERR_LOG).read_text()
  runs = tables.discover(res, "attention")
  assert [(r.name, r.status, r.reason) for r in runs] == [("bad", "failed", "ValueError: boom at step 3"),
                                                           ("good", "ok", "")]

  # a failed variant is retried on resume (no --force); once it succeeds its failure record is gone
  out = runner.run_variants([_v("bad", "ok"), _v("good")], res, launch_cmd=launcher, say=lines.append)
  assert [o.status for o in out] == ["ok", "skipped"]
  assert not (wd / runner.FAILURE_FILE).exists()
  assert [r.status for r in tables.discover(res, "attention")] == ["ok", "ok"]


def test_timeout_stops_the_run_and_its_process(tmp_path, launcher):
  res = tmp_path / "res"
  t0 = time.perf_counter()
  out = runner.run_variants([_v("slow", "hang")], res, launch_cmd=launcher, timeout_s=3.0, say=lambda s: None)
  assert time.perf_counter() - t0 < 30
  assert out[0].status == "failed" and out[0].reason == "timed out after 3s (--timeout_s)"
  pid = int((res / "attention_results" / "slow" / "pid").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_exit_zero_without_summary_is_a_failure(tmp_path, launcher):
  out = runner.run_variants([_v("q", "quiet")], tmp_path, launch_cmd=launcher, say=lambda s: None)
  assert (out[0].status, out[0].reason) == ("failed", "launch exited 0 but wrote no summary.json")


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
  lines = []
  out = runner.run_variants([_v("a")], tmp_path, dry_run=True, say=lines.append)
  assert out == [] and not (tmp_path / "attention_results").exists()
  assert lines == [f"[1/1] attention/a: would run: python -m launch --config=configs/base.py:tiny "
                   f"--config.fake.mode=ok --workdir={tmp_path}/attention_results/a --overwrite"]


def test_failure_reason_rules():
  assert runner.failure_reason("error: train.lr=0 trains nothing: set ...\n", 2) == \
      "error: train.lr=0 trains nothing: set ..."
  assert runner.failure_reason("W0000 warning\njaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: oom\n"
                               "I1127 exiting\n", 1) == "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: oom"
  assert runner.failure_reason("", -signal.SIGKILL) == "killed by signal SIGKILL (out of memory?)"
  assert runner.failure_reason("just text\n", 3) == "just text"
  assert runner.failure_reason("", 4) == "exit code 4 with no stderr"


def test_env_reaches_the_subprocess_and_the_callers_environment_wins(tmp_path, launcher, monkeypatch):
  monkeypatch.setenv("BENCH_B", "from caller")
  runner.run_variants([_v("a")], tmp_path, launch_cmd=launcher, say=lambda s: None,
                      env={"BENCH_A": "from runner", "BENCH_B": "from runner"})
  seen = json.loads((tmp_path / "attention_results" / "a" / "env.json").read_text())
  assert seen == {"BENCH_A": "from runner", "BENCH_B": "from caller"}


def test_jobs_run_variants_side_by_side_and_the_tables_say_so(tmp_path, launcher):
  from efficientllm_jax.bench import tables
  names = ["a", "b", "c", "d"]
  lines = []
  out = runner.run_variants([_v(n) for n in names], tmp_path, launch_cmd=launcher, say=lines.append, jobs=2)
  assert [o.variant.name for o in out] == names and all(o.status == "ok" for o in out)
  assert lines[-1].startswith("bench: 4 ran, 0 skipped, 0 failed in ") and lines[-1].endswith("(2 at a time)")
  # the first variant ran alone: its 'done' line comes before any other variant started
  assert lines.index("[1/4] attention/a: running A (configs/base.py:tiny)") == 0
  assert lines[1].startswith("[1/4] attention/a: done in ")
  meta = json.loads((tmp_path / "attention_results" / "c" / runner.VARIANT_FILE).read_text())
  assert meta["concurrent_jobs"] == 2
  runs = tables.discover(tmp_path, "attention", scale="smoke")
  assert any("variants at a time" in n and "contended" in n for n in tables._notes(runs))
  solo = tmp_path / "solo"
  runner.run_variants([_v("a")], solo, launch_cmd=launcher, say=lambda s: None)
  assert not any("contended" in n for n in tables._notes(tables.discover(solo, "attention", scale="smoke")))
