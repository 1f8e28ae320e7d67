"""Runs sweep variants one at a time, each `python -m launch` in its own subprocess (so each run's memory peak is
its own), with overall progress lines, resume and failure records.

Per variant, beside launch's own files in the workdir:
  bench_variant.json   what ran: sweep, name, label, scale, config, overrides, command
  bench_stdout.log / bench_stderr.log   the subprocess's output (the latest attempt)
  bench_failure.json   only after a failed attempt: return code and the reason (last error line of stderr)
Resume: a variant whose summary.json exists is skipped; force=True reruns it, and launch's --overwrite moves the
old run into previous-<time>/ (nothing is deleted). Every attempt passes --overwrite so leftovers of an
interrupted attempt are moved aside the same way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from efficientllm_jax.bench.sweeps import Variant

VARIANT_FILE = "bench_variant.json"
FAILURE_FILE = "bench_failure.json"
STDOUT_LOG, STDERR_LOG = "bench_stdout.log", "bench_stderr.log"
DEFAULT_LAUNCH = (sys.executable, "-m", "launch")
# A line that reads as the error itself: launch's "error: ...", a Python exception line, an XLA/absl fatal.
_ERROR_LINE = re.compile(r"^(error:|[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|F\d{4} |.*\bRESOURCE_EXHAUSTED\b)")


@dataclasses.dataclass
class Outcome:
  variant: Variant
  status: str  # ok | skipped | failed
  seconds: float = 0.0
  reason: str = ""


def summary_done(workdir: Path) -> bool:
  """A finished run: summary.json parses and does not say it failed, and the latest attempt did not fail (a
  failure before launch moved the old run aside, e.g. a config error, leaves both files: the failure counts)."""
  if (workdir / FAILURE_FILE).exists():
    return False
  try:
    s = json.loads((workdir / "summary.json").read_text())
  except (OSError, ValueError):
    return False
  return isinstance(s, dict) and s.get("status", "ok") == "ok"


def failure_reason(stderr: str, returncode: int) -> str:
  """The last line of stderr that reads as an error (else its last line), or what the exit code says."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  for line in reversed(lines):
    if _ERROR_LINE.match(line):
      return line
  if returncode < 0:
    name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
    why = " (out of memory?)" if -returncode == signal.SIGKILL else ""
    return f"killed by signal {name}{why}" + (f"; last stderr line: {lines[-1]}" if lines else "")
  if lines:
    return lines[-1]
  return f"exit code {returncode} with no stderr"


def _say(line: str) -> None:
  print(line, flush=True)


def _fmt_s(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _done_note(workdir: Path) -> str:
  """One short line of the finished run's headline numbers (either summary.json schema)."""
  try:
    s = json.loads((workdir / "summary.json").read_text())
  except (OSError, ValueError):
    return ""
  parts = []
  if isinstance(s.get("final_loss"), (int, float)):
    parts.append(f"final loss {s['final_loss']:.4f}")
  ppl = s.get("PPL", s.get("ppl"))
  if isinstance(ppl, (int, float)):
    parts.append(f"PPL {ppl:.2f}")
  if isinstance(s.get("tokens_per_s"), (int, float)):
    parts.append(f"{s['tokens_per_s']:,.0f} tok/s")
  return " | ".join(parts)


def run_variant(v: Variant, results_dir: Path, *, launch_cmd: Sequence[str] = DEFAULT_LAUNCH,
                timeout_s: float | None = None, stream: bool = False, prefix: str = "",
                env: dict[str, str] | None = None, concurrent_jobs: int = 1) -> tuple[bool, str]:
  """Trains one variant in a subprocess; returns (ok, reason). Its output goes to logs in the workdir. `env`
  adds variables to the subprocess's environment where this process's environment does not set them."""
  wd = v.workdir(results_dir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / FAILURE_FILE).unlink(missing_ok=True)
  cmd = [*launch_cmd, *v.launch_args(results_dir, overwrite=True)]
  meta = {**dataclasses.asdict(v), "command": cmd}
  if concurrent_jobs > 1:
    meta["concurrent_jobs"] = concurrent_jobs
  (wd / VARIANT_FILE).write_text(json.dumps(meta, indent=2))
  t0 = time.perf_counter()
  with open(wd / STDOUT_LOG, "w") as out, open(wd / STDERR_LOG, "w+") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                            env={**(env or {}), **os.environ},
                            start_new_session=True)  # its own process group: a timeout ends its children too
    pump = threading.Thread(target=_copy_lines, args=(proc.stdout, out, prefix if stream else None), daemon=True)
    pump.start()
    timed_out = False
    try:
      proc.wait(timeout=timeout_s or None)
    except subprocess.TimeoutExpired:
      timed_out = True
      _stop(proc)
    except BaseException:  # Ctrl-C: end the child too, then stop the sweep
      _stop(proc)
      raise
    finally:
      pump.join()
    rc = proc.returncode
    err.seek(0)
    stderr = err.read()
  if rc == 0 and summary_done(wd):
    return True, ""
  if timed_out:
    reason = f"timed out after {timeout_s:g}s (--timeout_s)"
  elif rc == 0:
    reason = "launch exited 0 but wrote no summary.json"
  else:
    reason = failure_reason(stderr, rc)
  record_failure(wd, rc, reason, command=cmd, seconds=time.perf_counter() - t0)
  return False, reason


def record_failure(workdir: Path, returncode: int | None, reason: str, **extra) -> None:
  """bench_failure.json: what the tables show for a variant whose latest attempt failed."""
  (Path(workdir) / FAILURE_FILE).write_text(json.dumps({"returncode": returncode, "reason": reason, **extra},
                                                       indent=2))


def _copy_lines(src, out, prefix: str | None) -> None:
  """The child's stdout into the log, and onto the console (indented) when streaming."""
  for line in src:
    out.write(line)
    if prefix is not None:
      _say(f"{prefix}{line.rstrip()}")
  src.close()


def _stop(proc: subprocess.Popen) -> None:
  """Ends the child's process group: SIGTERM, then SIGKILL if it lingers."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  except ProcessLookupError:
    proc.wait()


def command_line(v: Variant, results_dir: str | Path, launch_cmd: Sequence[str] = DEFAULT_LAUNCH) -> str:
  """The command as a user would type it (`python -m launch ...` for the default launcher)."""
  head = ["python", "-m", "launch"] if tuple(launch_cmd) == DEFAULT_LAUNCH else list(launch_cmd)
  return shlex.join([*head, *v.launch_args(results_dir, overwrite=True)])


def run_variants(variants: Sequence[Variant], results_dir: str | Path, *, force: bool = False,
                 launch_cmd: Sequence[str] = DEFAULT_LAUNCH, timeout_s: float | None = None, stream: bool = False,
                 dry_run: bool = False, say: Callable[[str], None] = _say,
                 env: dict[str, str] | None = None, jobs: int = 1) -> list[Outcome]:
  """Runs every variant; a failure is recorded and the sweep goes on. jobs > 1 runs that many variants at a time
  (after the first, which runs alone and fills the data cache the others read); each variant's
  bench_variant.json then records `concurrent_jobs`, and the tables say the time-based figures were contended."""
  results_dir = Path(results_dir)
  n = len(variants)
  t_all = time.perf_counter()

  def one(i: int, v: Variant) -> Outcome | None:
    tag = f"[{i}/{n}] {v.sweep}/{v.name}"
    wd = v.workdir(results_dir)
    if not force and summary_done(wd):
      say(f"{tag}: skipped, {wd / 'summary.json'} exists (--force reruns it)")
      return Outcome(v, "skipped")
    if dry_run:
      say(f"{tag}: would run: {command_line(v, results_dir, launch_cmd)}")
      return None
    say(f"{tag}: running {v.label} ({v.config})")
    t0 = time.perf_counter()
    ok, reason = run_variant(v, results_dir, launch_cmd=launch_cmd, timeout_s=timeout_s, stream=stream,
                             prefix="    ", env=env, concurrent_jobs=jobs)
    dt = time.perf_counter() - t0
    if ok:
      note = _done_note(wd)
      say(f"{tag}: done in {_fmt_s(dt)}" + (f" | {note}" if note else ""))
      return Outcome(v, "ok", dt)
    say(f"{tag}: FAILED in {_fmt_s(dt)}: {reason}  (log: {wd / STDERR_LOG})")
    return Outcome(v, "failed", dt, reason)

  numbered = list(enumerate(variants, 1))
  if jobs <= 1 or dry_run:
    results = [one(i, v) for i, v in numbered]
  else:
    results = [one(*numbered[0])] if numbered else []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      results += list(pool.map(lambda iv: one(*iv), numbered[1:]))
  outcomes = [o for o in results if o is not None]
  if not dry_run:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    say(f"bench: {counts['ok']} ran, {counts['skipped']} skipped, {counts['failed']} failed "
        f"in {_fmt_s(time.perf_counter() - t_all)}" + (f" ({jobs} at a time)" if jobs > 1 else ""))
  return outcomes
