"""Token streams -> packed fixed-length sequences -> grain pipeline (shuffle, batch, held-out split).

A source is anything with `__len__` and `__getitem__(i) -> {"inputs": int32[T], "targets": int32[T]}`;
`PackedTokens` packs one long token stream (documents joined by EOT) into windows of T+1 tokens with stride T.
Later sources (ArrayRecord shards from `data.prepare`) slot in beside it through `make_source`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from efficientllm_jax.data import corpus, tokenizer as tokenizer_lib


class DataError(ValueError):
  """A data problem the user can fix; str(err) is the one line to show."""


def cache_dir(cfg) -> Path:
  d = cfg.data.cache_dir or os.environ.get("EFFICIENTLLM_CACHE") or Path.home() / ".cache" / "efficientllm_jax"
  return Path(d)


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


def make_splits(cfg) -> Splits:
  if cfg.data.source == "embedded":
    splits = embedded_splits(cfg)
  else:
    raise DataError(f"data.source={cfg.data.source!r} is not known: use 'embedded'")
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


def train_iterator(source, cfg, *, start_step: int = 0):
  """Endless shuffled batches shaped [grad_accum, micro_batch, T], prefetched on a background thread."""
  a, b = cfg.train.grad_accum, cfg.train.micro_batch
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=cfg.data.shuffle_seed)
        .repeat()
        .batch(a * b, drop_remainder=True)
        .map(lambda x: {k: v.reshape(a, b, -1) for k, v in x.items()}))
  ds = ds[start_step:]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, cfg.data.prefetch))))


def eval_batches(source, cfg) -> list[dict[str, np.ndarray]]:
  """The first `train.eval_batches` micro-batches of the held-out split, in order (the same every eval)."""
  b = cfg.train.micro_batch
  n = min(cfg.train.eval_batches, len(source) // b)
  ds = grain.MapDataset.source(source).batch(b, drop_remainder=True)
  return [ds[i] for i in range(n)]
