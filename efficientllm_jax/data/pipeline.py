"""Token streams -> packed fixed-length sequences -> grain pipeline (shuffle, batch, held-out split).

A source is anything with `__len__` and `__getitem__(i) -> {"inputs": int32[T], "targets": int32[T]}`;
`PackedTokens` packs one long token stream (documents joined by EOT) into windows of T+1 tokens with stride T;
`ArrayRecordTokens` reads the same windows from the shards `data.prepare` writes (data.source='arrayrecord').
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
from efficientllm_jax.data import corpus, records, tokenizer as tokenizer_lib
from efficientllm_jax.data.corpus import cache_dir
from efficientllm_jax.data.records import DataError  # noqa: F401 (re-exported: launch catches pipeline.DataError)


class PackedTokens:
  """Random-access view of a token stream as (inputs, targets) windows of `seq_len`."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    self.n = max(len(tokens) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start = int(i) * self.seq_len
    w = self.tokens[start:start + self.seq_len + 1].astype(np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}


@dataclass
class Splits:
  train: PackedTokens
  eval: PackedTokens
  vocab_size: int  # ids used by the tokenizer (must be <= model.vocab_size)
  description: str


def _encode(tok, texts: list[str]) -> np.ndarray:
  eot = tok.token_to_id(tokenizer_lib.EOT)
  ids = []
  for enc in tok.encode_batch(texts, add_special_tokens=False):
    ids.extend(enc.ids)
    ids.append(eot)
  return np.asarray(ids, dtype=np.uint32)


def _cached(path: Path, build) -> np.ndarray:
  if path.exists():
    return np.load(path, mmap_mode="r")
  arr = build()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npy")
  np.save(tmp, arr)
  tmp.replace(path)
  return arr


def embedded_splits(cfg) -> Splits:
  """Tokenised stdlib corpus, cached under cache_dir keyed by corpus fingerprint and tokenizer."""
  d = cfg.data
  t0 = time.time()
  docs = corpus.read_documents(d.max_corpus_mb)
  fp = corpus.fingerprint(docs)
  tok_name = "bytes" if d.tokenizer == "bytes" else f"bpe{d.bpe_vocab_size}"
  root = cache_dir(cfg) / f"stdlib-{fp}"
  train_docs = [t for rel, t in docs if not corpus.is_heldout(rel, d.eval_fraction)]
  eval_docs = [t for rel, t in docs if corpus.is_heldout(rel, d.eval_fraction)]
  # The BPE is trained on the training split only: the held-out files stay unseen.
  tok = tokenizer_lib.get_tokenizer(d.tokenizer, vocab_size=d.bpe_vocab_size, texts=train_docs,
                                    cache_path=root / f"{tok_name}.json")
  frac = f"{d.eval_fraction:g}"
  train = _cached(root / f"{tok_name}-train-{frac}.npy", lambda: _encode(tok, train_docs))
  evals = _cached(root / f"{tok_name}-eval-{frac}.npy", lambda: _encode(tok, eval_docs))
  logging.info("embedded corpus: %d files, %d train / %d eval tokens (%.1fs)", len(docs), len(train), len(evals),
               time.time() - t0)
  desc = f"python stdlib ({len(docs)} files, {tok_name}, {len(train):,} train tokens)"
  return Splits(PackedTokens(train, d.seq_len), PackedTokens(evals, d.seq_len), tok.get_vocab_size(), desc)


class ArrayRecordTokens:
  """Random-access (inputs, targets) windows from prepared ArrayRecord shards; picklable for grain workers."""

  def __init__(self, root: Path, files: list[str], meta: dict, vocab_limit: int):
    from grain.sources import ArrayRecordDataSource
    self.paths = [str(root / f) for f in files]
    self.source = ArrayRecordDataSource(self.paths)
    self.dtype, self.record_len = np.dtype(meta["dtype"]), int(meta["record_len"])
    self.vocab_limit = vocab_limit

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    w = self.decode(self.source[int(i)], i)
    return {"inputs": w[:-1], "targets": w[1:]}

  def decode(self, raw: bytes, i) -> np.ndarray:
    if len(raw) != self.record_len * self.dtype.itemsize:
      raise DataError(f"record {i} of {Path(self.paths[0]).parent} holds {len(raw)} bytes, not "
                      f"{self.record_len} x {self.dtype}: the dataset is corrupt, re-run data.prepare with --overwrite")
    w = np.frombuffer(raw, self.dtype).astype(np.int32)
    if w.max() >= self.vocab_limit:
      raise DataError(f"record {i} of {Path(self.paths[0]).parent} holds token id {w.max()} >= model.vocab_size="
                      f"{self.vocab_limit}: set --config.model.vocab_size >= {w.max() + 1}")
    return w


def _open_split(root: Path, meta: dict, split: str, vocab_limit: int) -> ArrayRecordTokens | None:
  entries = meta[split]["shards"]
  if not entries:
    return None
  missing = [e["file"] for e in entries if not (root / e["file"]).is_file()]
  if missing:
    raise DataError(f"data.path={str(root)!r} lacks {len(missing)} {split} shard(s) listed in its metadata "
                    f"(first: {missing[0]}): re-run data.prepare with --overwrite")
  try:
    src = ArrayRecordTokens(root, [e["file"] for e in entries], meta, vocab_limit)
    # Touch both ends of every shard: a truncated or foreign file fails here, not hours into training.
    first = 0
    for e in entries:
      for i in {first, first + e["sequences"] - 1}:
        src.decode(src.source[i], i)
      first += e["sequences"]
  except DataError:
    raise
  except Exception as e:  # array_record raises RuntimeError/ValueError with multi-line C++ status text
    raise DataError(f"data.path={str(root)!r}: the {split} shards are unreadable "
                    f"({str(e).splitlines()[0][:200]}): re-run data.prepare with --overwrite") from None
  if len(src) != meta[split]["sequences"]:
    raise DataError(f"data.path={str(root)!r}: the {split} shards hold {len(src)} sequences but metadata.json says "
                    f"{meta[split]['sequences']}: re-run data.prepare with --overwrite")
  return src


def arrayrecord_splits(cfg) -> Splits:
  """The train / held-out shards of a `data.prepare` output directory, checked against the config."""
  root = Path(cfg.data.path).expanduser()
  meta = records.read_metadata(root)
  if meta["seq_len"] != cfg.data.seq_len:
    raise DataError(f"data.path={str(root)!r} was prepared with seq_len={meta['seq_len']} but data.seq_len="
                    f"{cfg.data.seq_len}: set --config.data.seq_len={meta['seq_len']} or re-run data.prepare")
  if meta["max_token_id"] >= cfg.model.vocab_size:
    raise DataError(f"data.path={str(root)!r} holds token ids up to {meta['max_token_id']} but model.vocab_size="
                    f"{cfg.model.vocab_size}: set --config.model.vocab_size >= {meta['max_token_id'] + 1}")
  train = _open_split(root, meta, "train", cfg.model.vocab_size)
  evals = _open_split(root, meta, "eval", cfg.model.vocab_size)
  if train is None:
    raise DataError(f"data.path={str(root)!r} holds no training sequences: add data or lower seq_len in data.prepare")
  if evals is None:
    raise DataError(f"data.path={str(root)!r} holds no held-out sequences: re-run data.prepare with a larger "
                    "--eval_fraction (eval loss and PPL need them)")
  tok = Path(str(meta["tokenizer"])).name if meta["tokenizer"] != "bytes" else "bytes"
  desc = (f"{root} ({meta['documents']:,} documents, {tok} tokenizer, {meta['train']['tokens']:,} train tokens)")
  return Splits(train, evals, int(meta["vocab_size"]), desc)


def make_splits(cfg) -> Splits:
  if cfg.data.source == "embedded":
    splits = embedded_splits(cfg)
  elif cfg.data.source == "arrayrecord":
    splits = arrayrecord_splits(cfg)
  else:
    raise DataError(f"data.source={cfg.data.source!r} is not known: use 'embedded' or 'arrayrecord'")
  if splits.vocab_size > cfg.model.vocab_size:
    raise DataError(f"the tokenizer has {splits.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}: "
                    f"set --config.model.vocab_size >= {splits.vocab_size}")
  per_step = cfg.train.micro_batch * cfg.train.grad_accum
  if len(splits.train) < per_step:
    raise DataError(f"the training split holds {len(splits.train)} sequences of data.seq_len={cfg.data.seq_len}, "
                    f"fewer than one step needs ({per_step}): lower data.seq_len or train.micro_batch, or use more "
                    "data (data.max_corpus_mb=0 takes the whole corpus)")
  if len(splits.eval) < cfg.train.micro_batch:
    raise DataError(f"the held-out split holds {len(splits.eval)} sequences of data.seq_len={cfg.data.seq_len}, "
                    f"fewer than train.micro_batch={cfg.train.micro_batch}: raise data.eval_fraction or lower "
                    "data.seq_len")
  return splits


class _Split(grain.transforms.Map):
  """[rows, T] -> [grad_accum, rows / grad_accum, T] (a class, not a lambda: worker processes pickle it)."""

  def __init__(self, accum: int):
    self.accum = accum

  def map(self, x):
    return {k: v.reshape(self.accum, -1, v.shape[-1]) for k, v in x.items()}


def train_iterator(source, cfg, *, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None):
  """Endless shuffled batches shaped [grad_accum, micro_batch / processes, T]: a checkpointable grain iterator.

  Each process reads every process_count-th sequence (its own shard) and makes its part of the global batch; the
  epoch order comes from data.shuffle_seed alone, so a run's data order is the same after a restart. With
  data.workers > 0, worker processes read and decode; otherwise a prefetch thread does.
  `it.get_state()` / `it.set_state()` (train/checkpoint.py saves them) resume at the exact batch."""
  a, b = cfg.train.grad_accum, cfg.train.micro_batch
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if b % count:
    raise DataError(f"train.micro_batch={b} does not split over {count} processes: use a multiple of {count}")
  ds = grain.MapDataset.source(source)
  if count > 1:
    ds = ds[index::count]
  ds = (ds.shuffle(seed=cfg.data.shuffle_seed)
        .repeat()
        .batch(a * b // count, drop_remainder=True)
        .map(_Split(a)))
  ds = ds[start_step:]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, cfg.data.prefetch)))
  workers = int(cfg.data.get("workers", 0))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker setup reads its absl flags (unparsed under pytest)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def eval_batches(source, cfg, *, process_index: int | None = None,
                 process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `train.eval_batches` micro-batches of the held-out split, in order (the same every eval); with
  several processes, this process's rows of each (rows index::count, as train_iterator shards)."""
  b = cfg.train.micro_batch
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  n = min(cfg.train.eval_batches, len(source) // b)
  ds = grain.MapDataset.source(source).batch(b, drop_remainder=True)
  return [{k: v[index::count] for k, v in ds[i].items()} for i in range(n)]
