"""The on-disk format written by `data.prepare` and read by the pipeline (kept free of jax/grain imports).

A prepared dataset is a directory:
  metadata.json            written last: its presence means the dataset is complete
  tokenizer.json           the tokenizer that produced the ids
  train-NNNNN.arrayrecord  packed sequences, one record = seq_len + 1 token ids (raw little-endian uint16/uint32);
  eval-NNNNN.arrayrecord   record k of a stream starts at token k * seq_len, so consecutive records share one token
  plan.json, stats-NNNNN.json   the work list and per-unit results that make `prepare` resumable
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1
METADATA = "metadata.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "eval")
ARRAYRECORD_OPTIONS = "group_size:1,uncompressed"  # group size 1: grain reads records at random


class DataError(ValueError):
  """A data problem the user can fix; str(err) is the one line to show."""


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.arrayrecord"


def stats_name(index: int) -> str:
  return f"stats-{index:05d}.json"


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_json_atomic(path: Path, obj) -> None:
  """Readers see the old file or the whole new one, never a prefix (a kill mid-write leaves only a .tmp)."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(path)


def read_metadata(root: str | Path) -> dict:
  """The dataset's metadata.json, or a DataError naming what is wrong with `root`."""
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"data.path={str(root)!r} does not exist: run python -m efficientllm_jax.data.prepare "
                    f"--out={root} first, or fix data.path")
  path = root / METADATA
  if not path.exists():
    hint = ("prepare did not finish: re-run the same prepare command to resume it" if (root / PLAN).exists()
            else "it is not a prepared dataset: point data.path at a directory written by data.prepare")
    raise DataError(f"data.path={str(root)!r} has no {METADATA}: {hint}")
  try:
    meta = json.loads(path.read_text())
    for key in ("seq_len", "vocab_size", "max_token_id", "dtype", "train", "eval"):
      meta[key]  # noqa: B018 (presence check)
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise DataError(f"{path} is corrupt ({type(e).__name__}: {e}): re-run data.prepare with --overwrite") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise DataError(f"{path} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}: "
                    "re-run data.prepare with --overwrite")
  return meta
