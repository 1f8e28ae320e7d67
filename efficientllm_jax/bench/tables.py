"""The comparison tables, built from the variants' workdirs: <stem>.txt (aligned text), <stem>.md and <stem>.csv.

A figure that is null in summary.json (or absent from an older summary.json, or belongs to a failed run) shows as
"n/a" in the text and markdown tables, whose notes list why; the csv keeps the reason in <key>_null_reason
columns and the numbers at full precision.

Both summary.json schemas are read: the metrics schema (AL_s, PPL, AMU_GB, ...) and the spine's first one
(step_time_s, ppl): an older key stands in for a missing newer one (ALIASES), and micro_batch / seq_len fall back
to the workdir's config.json.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from efficientllm_jax.bench import runner, sweeps

ALIASES = {"AL_s": "step_time_s", "PPL": "ppl"}  # new key -> the spine's first summary.json key
FROM_CONFIG = {"micro_batch": ("train", "micro_batch"), "seq_len": ("data", "seq_len"),
               "grad_accum": ("train", "grad_accum")}
NA = "n/a"
OLD_SCHEMA = "not in summary.json (written before the efficiency metrics existed)"


def _num(spec: str) -> Callable[[float], str]:
  return lambda v: format(v, spec)


def _int(v: float) -> str:
  return f"{int(v)}" if float(v).is_integer() else f"{v:g}"


def _pct(v: float) -> str:
  return f"{100 * v:.1f}"


def _count(n: float) -> str:
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= div:
      return f"{n / div:.2f}{unit}" if n / div < 10 else f"{n / div:.1f}{unit}"
  return f"{n:.0f}"


@dataclasses.dataclass(frozen=True)
class Column:
  title: str  # header in .txt / .md
  key: str  # summary.json key and .csv header
  fmt: Callable[[float], str]


# The paper's columns, in its order; params is composite (total/active) and handled apart.
COLUMNS = (
    Column("micro-batch", "micro_batch", _int),
    Column("seq", "seq_len", _int),
    Column("AMU (GB)", "AMU_GB", _num(".2f")),
    Column("peak mem (GB)", "peak_memory_GB", _num(".2f")),
    Column("PCU %", "PCU", _pct),
    Column("MFU %", "MFU", _pct),
    Column("AL (s)", "AL_s", _num(".4g")),
    Column("TT (tok/param/s)", "TT", _num(".3e")),
    Column("ST (smp/param/s)", "ST", _num(".3e")),
    Column("tokens/s", "tokens_per_s", _num(",.0f")),
    Column("AEC (W)", "AEC_W_total", _num(".1f")),
    Column("J/token", "J_per_token", _num(".3e")),
    Column("PPL", "PPL", _num(".2f")),
    Column("GPU-hours", "gpu_hours", _num(".3g")),
)
PARAMS_TITLE = "params (total/active)"


@dataclasses.dataclass
class Run:
  """One variant's workdir, read back."""
  sweep: str
  name: str
  label: str
  status: str  # ok | failed | incomplete | not run
  reason: str  # why it is not ok
  summary: dict
  config: dict
  workdir: Path
  scale: str | None = None
  concurrent_jobs: int = 1  # variants the runner ran at a time when this one ran (bench_variant.json)

  def value(self, key: str) -> tuple[object | None, str]:
    """(value, "") or (None, why it is n/a)."""
    if self.status != "ok":
      return None, f"{self.status}: {self.reason}" if self.reason else self.status
    s = self.summary
    if s.get(key) is not None:
      return s[key], ""
    if key in s:
      return None, str(s.get(f"{key}_null_reason") or "null in summary.json")
    if ALIASES.get(key) in s and s[ALIASES[key]] is not None:
      return s[ALIASES[key]], ""
    if key in FROM_CONFIG:
      node = self.config
      for part in FROM_CONFIG[key]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
      if isinstance(node, (int, float)):
        return node, ""
    return None, OLD_SCHEMA

  def params(self) -> tuple[tuple[object | None, str], tuple[object | None, str]]:
    p, why = self.value("params")
    if not isinstance(p, dict):
      return (None, why or "summary.json params is not a dict"), (None, why or "no params")
    total = (p["total"], "") if p.get("total") is not None else (None, "summary.json has no params.total")
    active = (p["active"], "") if p.get("active") is not None else (
        None, "no params.active in summary.json (dense: every parameter is active)")
    return total, active


def _read_json(path: Path) -> dict:
  try:
    d = json.loads(path.read_text())
    return d if isinstance(d, dict) else {}
  except (OSError, ValueError):
    return {}


def read_run(workdir: Path, *, sweep: str = "", label: str | None = None) -> Run:
  """Reads a workdir: the latest attempt failed if bench_failure.json is there (the runner removes it on retry)."""
  meta = _read_json(workdir / runner.VARIANT_FILE)
  summary = _read_json(workdir / "summary.json")
  config = _read_json(workdir / "config.json")
  failure = _read_json(workdir / runner.FAILURE_FILE)
  if (workdir / runner.FAILURE_FILE).exists():
    status, reason = "failed", str(failure.get("reason") or "see bench_stderr.log")
  elif summary and summary.get("status", "ok") != "ok":
    status, reason = "failed", f"summary.json says status {summary.get('status')!r}"
  elif summary:
    status, reason = "ok", ""
  elif workdir.exists() and any(workdir.iterdir()):
    status, reason = "incomplete", "no summary.json (interrupted or still running)"
  else:
    status, reason = "not run", "no run in this workdir yet"
  return Run(sweep=meta.get("sweep", sweep), name=workdir.name, label=label or meta.get("label", workdir.name),
             status=status, reason=reason, summary=summary, config=config, workdir=workdir,
             scale=meta.get("scale"), concurrent_jobs=int(meta.get("concurrent_jobs", 1)))


def _known_order(sweep: str) -> dict[str, int]:
  names = [v.name for scale in sweeps.SCALES for v in sweeps.expand(sweep, scale)]
  return {n: i for i, n in enumerate(dict.fromkeys(names))}


def discover(results_dir: str | Path, sweep: str, *, scale: str | None = None) -> list[Run]:
  """Every variant workdir of `sweep` under results_dir, in the sweep's order (unknown names after, by name)."""
  base = Path(results_dir) / sweeps.SWEEPS[sweep].results_subdir
  if not base.is_dir():
    return []
  order = _known_order(sweep)
  marks = ("summary.json", "config.json", runner.VARIANT_FILE, runner.FAILURE_FILE)
  dirs = [d for d in base.iterdir() if d.is_dir() and any((d / m).exists() for m in marks)]
  dirs.sort(key=lambda d: (order.get(d.name, len(order)), d.name))
  runs = [read_run(d, sweep=sweep) for d in dirs]
  return [r for r in runs if scale is None or r.scale in (None, scale)]


def runs_for(variants: Sequence[sweeps.Variant], results_dir: str | Path) -> list[Run]:
  return [read_run(v.workdir(results_dir), sweep=v.sweep, label=v.label) for v in variants]


# ---- rendering --------------------------------------------------------------------------------------------------

def _cells(run: Run) -> tuple[list[str], list[tuple[str, str]]]:
  """The display cells of one row and its (column title, reason) pairs for n/a cells."""
  label = run.label if run.status == "ok" else f"{run.label} [{run.status}]"
  (total, why_t), (active, _) = run.params()
  cells = [label, NA if total is None else (_count(total) + (f"/{_count(active)}" if active is not None else ""))]
  missing = [] if total is not None else [(PARAMS_TITLE, why_t)]
  for col in COLUMNS:
    v, why = run.value(col.key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      cells.append(col.fmt(v))
    else:
      cells.append(NA)
      missing.append((col.title, why or f"{col.key} is not a number"))
  return cells, missing


def _header() -> list[str]:
  return ["method", PARAMS_TITLE] + [c.title for c in COLUMNS]


def _notes(runs: Sequence[Run]) -> list[str]:
  """Failures first, then each n/a reason once, with the columns and runs it covers."""
  notes = [f"{r.label}: {r.status}: {r.reason}" for r in runs if r.status != "ok"]
  by_reason: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
  for r in runs:
    if r.status != "ok":
      continue
    for title, why in _cells(r)[1]:
      cols, labels = by_reason.setdefault(why, ({}, {}))
      cols[title] = None
      labels[r.label] = None
  ok = [r.label for r in runs if r.status == "ok"]
  for why, (cols, labels) in by_reason.items():
    who = "all runs" if list(labels) == ok and len(ok) > 1 else ", ".join(labels)
    notes.append(f"n/a {', '.join(cols)} ({who}): {why}")
  shared = sorted({r.concurrent_jobs for r in runs if r.status == "ok" and r.concurrent_jobs > 1})
  if shared:
    notes.append(f"these runs shared the machine ({'/'.join(map(str, shared))} variants at a time): AL, TT, ST, "
                 "tokens/s and GPU-hours are contended figures, for a pipeline check, not a comparison")
  return notes


def _context(runs: Sequence[Run]) -> str:
  ok = [r for r in runs if r.status == "ok"]
  cards = dict.fromkeys(f"{r.summary.get('devices', '?')} x {r.summary.get('device_kind', '?')}" for r in ok)
  steps = dict.fromkeys(str(r.summary.get("steps", "?")) for r in ok)
  parts = [f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({len(ok)} ok)"]
  if cards:
    parts.append("devices: " + ", ".join(cards))
  if steps:
    parts.append("steps: " + ", ".join(steps))
  return "; ".join(parts)


def render_text(title: str, runs: Sequence[Run]) -> str:
  rows = [_header()] + [_cells(r)[0] for r in runs]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

  def line(row):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

  out = [f"{title} - EfficientLLM benchmark", _context(runs), "", line(rows[0]),
         "  ".join("-" * w for w in widths)]
  out += [line(r) for r in rows[1:]]
  notes = _notes(runs)
  if notes:
    out += ["", "Notes:"] + [f"  {n}" for n in notes]
  return "\n".join(out) + "\n"


def render_markdown(title: str, runs: Sequence[Run]) -> str:
  def md(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

  header = _header()
  out = [f"## {title}", "", _context(runs), "", md(header), "|" + "|".join(
      ["---"] + ["---:"] * (len(header) - 1)) + "|"]
  out += [md(_cells(r)[0]) for r in runs]
  notes = _notes(runs)
  if notes:
    out += [""] + [f"- {n}" for n in notes]
  return "\n".join(out) + "\n"


CSV_VALUE_KEYS = ("params_total", "params_active") + tuple(c.key for c in COLUMNS)


def render_csv(runs: Sequence[Run]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["sweep", "variant", "method", "status", "status_reason", "device_kind", "devices", "steps",
              *CSV_VALUE_KEYS, *(f"{k}_null_reason" for k in CSV_VALUE_KEYS)])
  for r in runs:
    total, active = r.params()
    pairs = [total, active] + [r.value(c.key) for c in COLUMNS]
    values = [NA if v is None else repr(v) if isinstance(v, float) else str(v) for v, _ in pairs]
    reasons = ["" if v is not None else why for v, why in pairs]
    s = r.summary if r.status == "ok" else {}
    w.writerow([r.sweep, r.name, r.label, r.status, r.reason, s.get("device_kind", ""), s.get("devices", ""),
                s.get("steps", ""), *values, *reasons])
  return buf.getvalue()


def write_tables(sweep: str, runs: Sequence[Run], results_dir: str | Path) -> dict[str, Path]:
  """Writes <stem>.txt/.md/.csv under results_dir; returns their paths."""
  spec = sweeps.SWEEPS[sweep]
  results_dir = Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  paths = {ext: results_dir / f"{spec.table_stem}.{ext}" for ext in ("txt", "md", "csv")}
  paths["txt"].write_text(render_text(spec.title, runs))
  paths["md"].write_text(render_markdown(spec.title, runs))
  paths["csv"].write_text(render_csv(runs))
  return paths
