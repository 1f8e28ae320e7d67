"""PNG plots per sweep (matplotlib, Agg backend: files only): bars of the key metrics, and loss vs wall time.

Wall time of a loss curve: training time only, rebuilt from metrics.jsonl's train rows; each row's step_time is
the mean step time over the steps since the previous row, so the clock advances step_time x (steps since the
previous row). The first step (compilation) and evaluation are left out, as they are from AL.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # absl would print its font-cache INFO lines
import matplotlib.pyplot as plt  # noqa: E402

from efficientllm_jax.bench import sweeps  # noqa: E402
from efficientllm_jax.bench.tables import Run  # noqa: E402

# (panel title, summary key, scale to display units)
BAR_METRICS = (
    ("tokens/s", "tokens_per_s", 1.0), ("AL (s/step)", "AL_s", 1.0), ("MFU (%)", "MFU", 100.0),
    ("PCU (%)", "PCU", 100.0), ("AMU (GB)", "AMU_GB", 1.0), ("peak memory (GB)", "peak_memory_GB", 1.0),
    ("AEC (W)", "AEC_W_total", 1.0), ("PPL", "PPL", 1.0),
)


def loss_curve(workdir: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
  """(train [(seconds, loss)], eval [(seconds, loss)]) from workdir/metrics.jsonl; empty lists when absent."""
  try:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  except OSError:
    return [], []
  rows = []
  for line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue  # a torn last line of an interrupted run
  train, marks, evals = [], [], []
  clock, prev_step = 0.0, 1  # step 1 carries compilation: not training time
  for r in rows:
    if r.get("split") != "train" or not _finite(r.get("loss")):
      continue
    if _finite(r.get("step_time")):
      clock += r["step_time"] * max(r["step"] - prev_step, 0)
    prev_step = r["step"]
    train.append((clock, r["loss"]))
    marks.append((r["step"], clock))
  for r in rows:
    if r.get("split") == "eval" and _finite(r.get("loss")):
      at = [t for s, t in marks if s <= r["step"]]
      evals.append((at[-1] if at else 0.0, r["loss"]))
  return train, evals


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_metrics(title: str, runs: Sequence[Run], path: Path) -> Path:
  cols = 4
  rows = math.ceil(len(BAR_METRICS) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
  labels = [r.label for r in runs]
  for ax, (name, key, scale) in zip(axes.flat, BAR_METRICS):
    values = [r.value(key)[0] for r in runs]
    xs = range(len(runs))
    heights = [v * scale if _finite(v) else 0.0 for v in values]
    bars = ax.bar(xs, heights, color=[f"C{i % 10}" for i in xs])
    top = max(heights, default=0.0)
    for bar, v, h in zip(bars, values, heights):
      text = "n/a" if not _finite(v) else f"{h:,.0f}" if abs(h) >= 1000 else f"{h:.3g}"
      ax.annotate(text, (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7,
                  xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.set_title(name, fontsize=10)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
  for ax in list(axes.flat)[len(BAR_METRICS):]:
    ax.axis("off")
  fig.suptitle(f"{title}: key metrics (n/a: not measured or failed, see the table's notes)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_loss(title: str, runs: Sequence[Run], path: Path) -> Path:
  fig, ax = plt.subplots(figsize=(8, 5))
  drawn = 0
  for i, r in enumerate(runs):
    train, evals = loss_curve(r.workdir)
    if not train:
      continue
    ax.plot(*zip(*train), color=f"C{i % 10}", label=r.label, lw=1.4)
    if evals:
      ax.plot(*zip(*evals), "o", color=f"C{i % 10}", ms=5, mfc="none")
    drawn += 1
  if not drawn:
    ax.text(0.5, 0.5, "no metrics.jsonl with train losses yet", ha="center", va="center", transform=ax.transAxes)
  ax.set_xlabel("training wall time (s, compilation and eval excluded)")
  ax.set_ylabel("loss (lines: train, circles: eval)")
  ax.set_title(f"{title}: loss vs wall time")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_plots(sweep: str, runs: Sequence[Run], results_dir: str | Path) -> list[Path]:
  spec = sweeps.SWEEPS[sweep]
  stem = spec.table_stem.removesuffix("_table")
  results_dir = Path(results_dir)
  return [plot_metrics(spec.title, runs, results_dir / f"{stem}_metrics.png"),
          plot_loss(spec.title, runs, results_dir / f"{stem}_loss.png")]
