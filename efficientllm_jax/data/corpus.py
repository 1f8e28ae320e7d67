"""The embedded default corpus: the running Python's standard-library sources (on every machine, no download).

Documents are split into train / held-out by a hash of their relative path, so no file is in both.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def cache_dir(cfg) -> Path:
  """Where tokenizers, tokenised corpora and the smoke suite's compile cache live (data.cache_dir, else
  $EFFICIENTLLM_CACHE, else ~/.cache/efficientllm_jax)."""
  d = cfg.data.cache_dir or os.environ.get("EFFICIENTLLM_CACHE") or Path.home() / ".cache" / "efficientllm_jax"
  return Path(d)


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
  """Every .py under the stdlib, sorted by relative path (deterministic across runs)."""
  root = root or stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
  return sorted(out, key=lambda p: str(p.relative_to(root)))


def is_heldout(rel_path: str, eval_fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:4], "little")
  return (h % 10_000) < eval_fraction * 10_000


def read_documents(max_mb: float = 0.0, root: Path | None = None) -> list[tuple[str, str]]:
  """[(relative path, text)], at most `max_mb` megabytes in total (0 = all), in sorted path order."""
  root = root or stdlib_root()
  docs, total = [], 0
  for path in stdlib_files(root):
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue  # a few stdlib test files are deliberately not UTF-8
    if not text.strip():
      continue
    docs.append((str(path.relative_to(root)), text))
    total += len(text.encode())
    if max_mb and total >= max_mb * 1e6:
      break
  if not docs:
    raise FileNotFoundError(f"no readable .py files under {root}: the embedded corpus needs the Python stdlib sources")
  return docs


def fingerprint(docs: list[tuple[str, str]]) -> str:
  h = hashlib.sha1()
  for rel, text in docs:
    h.update(rel.encode())
    h.update(hashlib.sha1(text.encode()).digest())
  return h.hexdigest()[:12]
