"""Tokenise text / jsonl / parquet files into packed ArrayRecord shards that `data.source='arrayrecord'` trains on.

  python -m efficientllm_jax.data.prepare --input=corpus/*.jsonl --tokenizer=/models/Qwen2.5-0.5B \
      --seq_len=8192 --out=/data/mycorpus

Inputs are cut into work units (a text file; a byte range of about --chunk_mb of a jsonl / line-per-document text
file, cut at line starts; a run of parquet row groups), tokenised in parallel worker processes. Each unit's documents
are joined by the end-of-text id and packed into records of seq_len + 1 tokens with stride seq_len (the layout
`PackedTokens` uses for the embedded corpus); the unit's tail shorter than a record is dropped and counted. Every
sequence goes to the held-out shards with probability --eval_fraction, decided by a hash of (unit, sequence index),
so the split is the same on every re-run. A unit is finished once its stats file exists (shards are renamed into
place first), so a killed run resumes where it stopped; metadata.json is written last.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from efficientllm_jax.data import records, tokenizer as tokenizer_lib
from efficientllm_jax.data.records import DataError

FORMATS = ("text", "jsonl", "parquet")
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}
BATCH_CHARS = 4 << 20  # documents handed to the tokenizer at once


@dataclass(frozen=True)
class Options:
  tokenizer: str
  seq_len: int
  field: str = "text"
  text_unit: str = "file"  # file: a text file is one document | line: each non-empty line is one
  eval_fraction: float = 0.01
  eot: str = tokenizer_lib.EOT
  chunk_mb: float = 64.0


@dataclass(frozen=True)
class Unit:
  index: int
  path: str
  fmt: str
  start: int  # byte offset (jsonl, line text) or first row group (parquet)
  stop: int  # end byte offset (exclusive) or row group
  size: int  # input bytes covered (progress and throughput)


# ---------------------------------------------------------------------------------------------------------- inputs

def find_inputs(patterns: list[str]) -> list[Path]:
  """Files named directly, matched by a glob, or found (with a known extension) under a directory; sorted."""
  found: set[Path] = set()
  for pat in patterns:
    matches = [Path(p) for p in glob.glob(os.path.expanduser(pat), recursive=True)] or [Path(pat)]
    for m in matches:
      if m.is_dir():
        found.update(p for p in m.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
      elif m.is_file():
        found.add(m)
      else:
        raise DataError(f"--input {pat!r} matches no file: check the path (globs like 'dir/*.jsonl' are allowed)")
  if not found:
    raise DataError(f"--input={','.join(patterns)} holds no .txt/.md/.jsonl/.json/.parquet files")
  return sorted(p.resolve() for p in found)


def file_format(path: Path, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  kind = EXTENSIONS.get(path.suffix.lower())
  if kind is None:
    raise DataError(f"cannot tell the format of {path} from its extension: pass --format={'|'.join(FORMATS)}")
  return kind


def plan_units(files: list[Path], fmt: str, opts: Options) -> list[Unit]:
  chunk = max(int(opts.chunk_mb * 2**20), 1)
  units: list[Unit] = []

  def add(path, kind, start, stop, size):
    units.append(Unit(len(units), str(path), kind, start, stop, size))

  for path in files:
    kind, size = file_format(path, fmt), path.stat().st_size
    if kind == "parquet":
      for start, stop, nbytes in _row_group_runs(path, chunk):
        add(path, kind, start, stop, nbytes)
    elif kind == "text" and opts.text_unit == "file":
      add(path, kind, 0, size, size)
    else:  # line-delimited: byte ranges, each owning the lines that start inside it
      for start in range(0, max(size, 1), chunk):
        add(path, kind, start, min(start + chunk, size), min(chunk, size - start))
  return units


def _row_group_runs(path: Path, chunk: int) -> list[tuple[int, int, int]]:
  import pyarrow.parquet as pq
  try:
    meta = pq.ParquetFile(path).metadata
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a non-parquet file
    raise DataError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
  runs, start, acc = [], 0, 0
  for g in range(meta.num_row_groups):
    acc += meta.row_group(g).total_byte_size
    if acc >= chunk:
      runs.append((start, g + 1, acc))
      start, acc = g + 1, 0
  if start < meta.num_row_groups:
    runs.append((start, meta.num_row_groups, acc))
  return runs


# ------------------------------------------------------------------------------------------------------- documents

def iter_documents(unit: Unit, opts: Options) -> Iterator[str]:
  if unit.fmt == "parquet":
    yield from _parquet_docs(unit, opts.field)
  elif unit.fmt == "text" and opts.text_unit == "file":
    text = _decode(Path(unit.path).read_bytes(), unit.path, 0)
    if text.strip():
      yield text
  else:
    for offset, line in _lines(unit):
      if unit.fmt == "jsonl":
        text = _json_field(line, unit.path, offset, opts.field)
      else:
        text = _decode(line, unit.path, offset).rstrip("\r\n")
      if text and text.strip():
        yield text


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
  """(offset, line) for the lines that start in [unit.start, unit.stop)."""
  with open(unit.path, "rb") as f:
    pos = unit.start
    if pos > 0:
      f.seek(pos - 1)
      pos += len(f.readline()) - 1  # the line in progress at `start` belongs to the previous unit
    while pos < unit.stop:
      line = f.readline()
      if not line:
        return
      yield pos, line
      pos += len(line)


def _decode(data: bytes, path: str, offset: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} (byte {offset + e.start}) is not UTF-8 text: convert it, e.g. iconv -t utf-8") from None


def _json_field(line: bytes, path: str, offset: int, field: str) -> str:
  if not line.strip():
    return ""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path} (byte {offset}): not a JSON line ({e.msg}): each line must be one JSON object") from None
  if not isinstance(obj, dict) or field not in obj:
    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{path} (byte {offset}): no {field!r} field (found: {keys}): pass --field=NAME")
  text = obj[field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise DataError(f"{path} (byte {offset}): field {field!r} holds {type(text).__name__}, not text: "
                    "pass --field=NAME of a string field")
  return text


def _parquet_docs(unit: Unit, field: str) -> Iterator[str]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(unit.path)
  if field not in pf.schema_arrow.names:
    raise DataError(f"{unit.path}: no {field!r} column (found: {', '.join(pf.schema_arrow.names)}): "
                    "pass --field=NAME")
  for batch in pf.iter_batches(batch_size=4096, row_groups=range(unit.start, unit.stop), columns=[field]):
    for text in batch.column(0).to_pylist():
      if text is not None and not isinstance(text, str):
        raise DataError(f"{unit.path}: column {field!r} holds {type(text).__name__}, not text: pass --field=NAME")
      if text and text.strip():
        yield text


# ----------------------------------------------------------------------------------------------------- tokenising

class Encoder:
  """Documents -> one id stream with the end-of-text id after each document."""

  def __init__(self, spec: str, eot: str):
    self.tok = load_tokenizer(spec)
    self.eot = self.tok.token_to_id(eot)
    if self.eot is None:
      raise DataError(f"tokenizer {spec!r} has no {eot!r} token to separate documents: pass --eot=TOKEN "
                      "(e.g. --eot='</s>')")
    # The byte tokenizer is a fixed byte -> id table: a numpy gather is ~50x faster than the BPE machinery and
    # gives the same ids (tests/test_prepare.py checks); a literal "<|endoftext|>" in text stays bytes there.
    self.table = tokenizer_lib.byte_table(self.tok) if spec == "bytes" else None
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, docs: list[str]) -> np.ndarray:
    eot = np.asarray([self.eot], np.uint32)
    if self.table is not None:
      parts = [self.table[np.frombuffer(d.encode("utf-8"), np.uint8)] for d in docs]
    else:
      parts = [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch_fast(docs, add_special_tokens=False)]
    return np.concatenate([x for p in parts for x in (p, eot)]) if parts else np.zeros(0, np.uint32)


def load_tokenizer(spec: str):
  try:
    return tokenizer_lib.load(spec)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(str(e)) from None


def in_eval(unit: Unit, seq_index: int, fraction: float) -> bool:
  key = f"{Path(unit.path).name}:{unit.start}:{seq_index}".encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") < fraction * 2.0**64


class Packer:
  """Cuts an id stream into records of seq_len + 1 ids (stride seq_len) and routes each to a split's writer."""

  def __init__(self, unit: Unit, opts: Options, writers: dict, dtype: str):
    self.unit, self.opts, self.writers, self.dtype = unit, opts, writers, np.dtype(dtype)
    self.pending = np.zeros(0, np.uint32)
    self.count = {s: 0 for s in records.SPLITS}
    self.max_id = -1

  def add(self, ids: np.ndarray) -> None:
    if len(ids):
      self.max_id = max(self.max_id, int(ids.max()))
    buf = np.concatenate([self.pending, ids])
    t = self.opts.seq_len
    n = max((len(buf) - 1) // t, 0)
    for k in range(n):
      rec = buf[k * t: k * t + t + 1].astype(self.dtype).tobytes()
      split = "eval" if in_eval(self.unit, sum(self.count.values()), self.opts.eval_fraction) else "train"
      self.writers[split].write(rec)
      self.count[split] += 1
    self.pending = buf[n * t:]

  @property
  def dropped(self) -> int:
    return max(len(self.pending) - 1, 0)


def process_unit(job: tuple[Unit, Options, str, str]) -> dict:
  """Tokenises and packs one unit into <out>/{train,eval}-NNNNN.arrayrecord; returns (and writes) its stats."""
  from array_record.python.array_record_module import ArrayRecordWriter
  unit, opts, out, dtype = job
  out = Path(out)
  enc = _worker_encoder(opts)
  t0 = time.perf_counter()
  tmp = {s: out / f".{records.shard_name(s, unit.index)}.tmp" for s in records.SPLITS}
  writers = {s: ArrayRecordWriter(str(p), records.ARRAYRECORD_OPTIONS) for s, p in tmp.items()}
  packer, docs, tokens, batch, chars = Packer(unit, opts, writers, dtype), 0, 0, [], 0
  try:
    for text in iter_documents(unit, opts):
      batch.append(text)
      chars += len(text)
      if chars >= BATCH_CHARS:
        ids = enc.encode(batch)
        docs, tokens, batch, chars = docs + len(batch), tokens + len(ids), [], 0
        packer.add(ids)
    if batch:
      ids = enc.encode(batch)
      docs, tokens = docs + len(batch), tokens + len(ids)
      packer.add(ids)
  finally:
    for w in writers.values():
      w.close()
  shards = {}
  for s, p in tmp.items():
    if packer.count[s]:
      p.replace(out / records.shard_name(s, unit.index))
      shards[s] = records.shard_name(s, unit.index)
    else:
      p.unlink()
  stats = {"unit": asdict(unit), "documents": docs, "tokens": tokens, "dropped_tokens": packer.dropped,
           "max_token_id": packer.max_id, "sequences": packer.count, "shards": shards,
           "seconds": time.perf_counter() - t0}
  records.write_json_atomic(out / records.stats_name(unit.index), stats)  # the unit's commit point
  return stats


_ENCODER: dict[tuple[str, str], Encoder] = {}  # per process; forked workers inherit the driver's


def _worker_encoder(opts: Options) -> Encoder:
  key = (opts.tokenizer, opts.eot)
  if key not in _ENCODER:
    _ENCODER[key] = Encoder(*key)
  return _ENCODER[key]


# ------------------------------------------------------------------------------------------------------ the driver

def _fingerprint(files: list[Path], fmt: str, opts: Options, tok_json: str) -> dict:
  return {"inputs": [{"path": str(p), "bytes": p.stat().st_size, "mtime": int(p.stat().st_mtime)} for p in files],
          "format": fmt, "options": asdict(opts), "tokenizer_sha1": hashlib.sha1(tok_json.encode()).hexdigest()}


def _claim_output(out: Path, plan: dict, overwrite: bool) -> None:
  """Creates `out`, resumes a matching unfinished run, or refuses to touch an existing one without overwrite."""
  ours = [p for p in out.iterdir() if _is_ours(p.name)] if out.is_dir() else []
  if overwrite:
    for p in ours:  # only our own files: a mistyped --out never loses anything else
      p.unlink()
  elif (out / records.METADATA).exists():
    raise DataError(f"--out={out} already holds a prepared dataset: pass --overwrite to replace it or pick another "
                    "--out")
  elif (out / records.PLAN).exists():
    try:
      old = json.loads((out / records.PLAN).read_text())
    except json.JSONDecodeError:
      old = None
    if old != plan:
      raise DataError(f"--out={out} holds an unfinished prepare of different inputs or options: re-run that command "
                      "to finish it, or pass --overwrite to start over")
    return
  elif out.is_dir() and any(out.iterdir()):
    raise DataError(f"--out={out} is not empty: pick an empty or new directory, or pass --overwrite")
  try:
    out.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(out / records.PLAN, plan)
  except OSError as e:
    raise DataError(f"cannot write --out={out} ({e.strerror or e}): pick a directory you can write to") from None


def _is_ours(name: str) -> bool:
  base = name.lstrip(".").removesuffix(".tmp")
  return (base in (records.METADATA, records.PLAN, records.TOKENIZER) or base.startswith("stats-")
          or (base.endswith(".arrayrecord") and base.split("-")[0] in records.SPLITS))


def _done_stats(out: Path, unit: Unit) -> dict | None:
  path = out / records.stats_name(unit.index)
  if not path.exists():
    return None
  stats = json.loads(path.read_text())
  if stats["unit"] != asdict(unit) or not all((out / n).exists() for n in stats["shards"].values()):
    return None
  return stats


class Progress:
  """One status line: a carriage-return line on a terminal, else a line every few seconds."""

  def __init__(self, total_bytes: int, total_units: int, stream=sys.stderr):
    self.total, self.units, self.stream = total_bytes, total_units, stream
    self.tty = stream.isatty()
    self.t0 = self.last = time.perf_counter()
    self.done_bytes = self.done_units = self.tokens = 0

  def update(self, stats: dict, *, skipped: bool = False) -> None:
    self.done_units += 1
    if not skipped:
      self.done_bytes += stats["unit"]["size"]
      self.tokens += stats["tokens"]
    else:
      self.total -= stats["unit"]["size"]
    now = time.perf_counter()
    if self.tty or now - self.last >= 5 or self.done_units == self.units:
      self.last = now
      dt = max(now - self.t0, 1e-9)
      rate = self.done_bytes / dt
      eta = (self.total - self.done_bytes) / rate if rate else 0.0
      line = (f"prepare: {self.done_units}/{self.units} units | {self.done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f}"
              f" MB | {rate / 1e6:.1f} MB/s | {self.tokens / dt / 1e6:.2f}M tok/s | ETA {eta:.0f}s")
      print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

  def close(self) -> None:
    if self.tty:
      print(file=self.stream)


def prepare(inputs: list[str], out: str | Path, opts: Options, *, fmt: str = "auto", workers: int = 0,
            overwrite: bool = False, stream=sys.stderr) -> dict:
  """Runs (or resumes) a prepare; returns the metadata written to <out>/metadata.json."""
  if opts.seq_len < 1:
    raise DataError(f"--seq_len={opts.seq_len} must be a positive number of tokens")
  if not 0 <= opts.eval_fraction < 1:
    raise DataError(f"--eval_fraction={opts.eval_fraction} must be in [0, 1)")
  if fmt not in (*FORMATS, "auto"):
    raise DataError(f"--format={fmt!r} is not known: use auto, {', '.join(FORMATS)}")
  if opts.text_unit not in ("file", "line"):
    raise DataError(f"--text_unit={opts.text_unit!r} is not known: use file or line")
  out = Path(out).expanduser().resolve()
  enc = _worker_encoder(opts)  # fails fast on a bad tokenizer, before any output exists
  tok_json = enc.tok.to_str()
  files = find_inputs(inputs)
  units = plan_units(files, fmt, opts)
  plan = {"format_version": records.FORMAT_VERSION, **_fingerprint(files, fmt, opts, tok_json),
          "units": [asdict(u) for u in units]}
  _claim_output(out, plan, overwrite)
  dtype = records.token_dtype(enc.vocab_size)

  results: dict[int, dict] = {}
  progress = Progress(sum(u.size for u in units), len(units), stream)
  todo = []
  for u in units:
    stats = _done_stats(out, u)
    if stats is None:
      todo.append(u)
    else:
      results[u.index] = stats
      progress.update(stats, skipped=True)
  if results:
    print(f"prepare: resuming, {len(results)} of {len(units)} units already done", file=stream, flush=True)
  jobs = [(u, opts, str(out), dtype) for u in todo]
  workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
  t0 = time.perf_counter()
  try:
    if workers <= 1:
      for job in jobs:
        stats = process_unit(job)
        results[stats["unit"]["index"]] = stats
        progress.update(stats)
    else:
      # ProcessPoolExecutor, not Pool: a worker that dies (OOM kill) breaks the pool instead of hanging it.
      with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_quiet_worker) as pool:
        try:
          for fut in as_completed([pool.submit(process_unit, job) for job in jobs]):
            stats = fut.result()
            results[stats["unit"]["index"]] = stats
            progress.update(stats)
        except BrokenProcessPool:
          raise DataError("a prepare worker process died (out of memory?): re-run the same command to resume, "
                          "with fewer --workers or a smaller --chunk_mb") from None
        except BaseException:
          pool.shutdown(cancel_futures=True)
          raise
  finally:
    progress.close()
  meta = _metadata(out, units, results, opts, fmt, enc, dtype, files, time.perf_counter() - t0)
  if meta["train"]["sequences"] == 0:
    raise DataError(f"the inputs hold {meta['tokens']:,} tokens in {meta['documents']:,} documents, not one training "
                    f"sequence of --seq_len={opts.seq_len} + 1 per work unit: lower --seq_len or add data")
  enc.tok.save(str(out / records.TOKENIZER))
  records.write_json_atomic(out / records.METADATA, meta)
  return meta


_FORK_SAFE = False  # set by the CLI, whose process never starts JAX's (non-Python) threads


def _pool_context():
  """fork from the CLI: workers inherit the loaded tokenizer instead of importing for seconds; forkserver when called
  from a process that may run JAX threads (forking those can deadlock the child)."""
  if _FORK_SAFE and sys.platform == "linux":
    return multiprocessing.get_context("fork")
  ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
  if sys.platform != "win32":
    ctx.set_forkserver_preload([__name__])
  return ctx


def _quiet_worker() -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes


def _metadata(out, units, results, opts, fmt, enc, dtype, files, seconds) -> dict:
  split = {s: {"shards": [], "sequences": 0} for s in records.SPLITS}
  for u in units:
    st = results[u.index]
    for s in records.SPLITS:
      if s in st["shards"]:
        split[s]["shards"].append({"file": st["shards"][s], "sequences": st["sequences"][s]})
        split[s]["sequences"] += st["sequences"][s]
  for s in records.SPLITS:
    split[s]["tokens"] = split[s]["sequences"] * opts.seq_len  # target tokens per epoch
  total = lambda k: sum(results[u.index][k] for u in units)
  return {
      "format_version": records.FORMAT_VERSION,
      "tokenizer": opts.tokenizer, "tokenizer_file": records.TOKENIZER, "vocab_size": enc.vocab_size,
      "eot": opts.eot, "eot_id": enc.eot, "dtype": dtype, "seq_len": opts.seq_len, "record_len": opts.seq_len + 1,
      "documents": total("documents"), "tokens": total("tokens"), "dropped_tokens": total("dropped_tokens"),
      "max_token_id": max(results[u.index]["max_token_id"] for u in units),
      "eval_fraction": opts.eval_fraction, "input_format": fmt, "field": opts.field, "text_unit": opts.text_unit,
      "inputs": [str(p) for p in files], "input_bytes": sum(u.size for u in units), "units": len(units),
      "train": split["train"], "eval": split["eval"],
      "seconds_this_run": round(seconds, 3),
  }


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  global _FORK_SAFE
  _FORK_SAFE = True
  opts = Options(tokenizer=f.tokenizer, seq_len=f.seq_len, field=f.field, text_unit=f.text_unit,
                 eval_fraction=f.eval_fraction, eot=f.eot, chunk_mb=f.chunk_mb)
  try:
    meta = prepare(f.input, f.out, opts, fmt=f.format, workers=f.workers, overwrite=f.overwrite)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"prepared {f.out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens -> "
        f"{meta['train']['sequences']:,} train / {meta['eval']['sequences']:,} eval sequences of {meta['seq_len']} "
        f"({meta['dtype']}, vocab {meta['vocab_size']:,}; {meta['dropped_tokens']:,} tail tokens dropped)")
  if not meta["eval"]["sequences"]:
    print("warning: no held-out sequences: training on this dataset will stop asking for eval data; raise "
          "--eval_fraction", file=sys.stderr)


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_list("input", None, "Input files, directories or globs (comma-separated).")
  flags.DEFINE_string("tokenizer", "bytes", "'bytes' or a Hugging Face tokenizer.json (or the directory holding it).")
  flags.DEFINE_integer("seq_len", 8192, "Tokens per training sequence (records hold seq_len + 1).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "auto", ["auto", *FORMATS], "Input format; auto = by file extension.")
  flags.DEFINE_string("field", "text", "jsonl field / parquet column holding the document text.")
  flags.DEFINE_enum("text_unit", "file", ["file", "line"], "Text files: one document per file or per line.")
  flags.DEFINE_float("eval_fraction", 0.01, "Fraction of sequences written to the held-out eval shards.")
  flags.DEFINE_string("eot", tokenizer_lib.EOT, "Token appended after every document.")
  flags.DEFINE_float("chunk_mb", 64.0, "Work-unit size for line-based and parquet inputs.")
  flags.DEFINE_integer("workers", 0, "Worker processes (0 = one per CPU).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing prepared dataset in --out.")
  flags.mark_flags_as_required(["input", "out"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
