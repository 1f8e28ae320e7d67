"""data.source='arrayrecord': reading prepared shards, sharding, the checkpointable iterator, and broken datasets."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs import base
from efficientllm_jax import config as config_lib
from efficientllm_jax.data import pipeline, prepare, records, tokenizer as tokenizer_lib
from efficientllm_jax.data.records import DataError

SEQ = 16


def docs(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = ["alpha", "beta", "gamma", "δέλτα", "εψιλον", "zeta\n", "η", "θ!"]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("ds")
  (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(400)))
  prepare.prepare([str(root / "a.jsonl")], root / "out", prepare.Options("bytes", SEQ, eval_fraction=0.1),
                  stream=io.StringIO())
  return root / "out"


def cfg_for(path: Path, **over):
  c = base.get_config("tiny")
  c.data.source, c.data.path, c.data.seq_len = "arrayrecord", str(path), SEQ
  c.model.vocab_size = 512
  c.train.micro_batch, c.train.grad_accum = 4, 2
  for k, v in over.items():
    section, key = k.split("__")
    c[section][key] = v
  return config_lib.validate(c)


def stream_windows(path: Path) -> set[tuple]:
  """All windows of the reference stream (tokenizers' byte tokenizer, EOT after each document)."""
  tok = tokenizer_lib.byte_tokenizer()
  ids = []
  for line in (path.parent / "a.jsonl").read_text().splitlines():
    ids += tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [0]
  return {tuple(ids[k * SEQ: k * SEQ + SEQ + 1]) for k in range((len(ids) - 1) // SEQ)}


def test_splits_read_the_prepared_windows(dataset):
  s = pipeline.make_splits(cfg_for(dataset))
  meta = json.loads((dataset / records.METADATA).read_text())
  assert len(s.train) == meta["train"]["sequences"] and len(s.eval) == meta["eval"]["sequences"] > 0
  windows = stream_windows(dataset)
  for src in (s.train, s.eval):
    for i in range(0, len(src), 7):
      x = src[i]
      assert x["inputs"].dtype == np.int32
      np.testing.assert_array_equal(x["inputs"][1:], x["targets"][:-1])
      assert tuple(x["inputs"]) + (x["targets"][-1],) in windows
  assert s.vocab_size == 257


def batches(it, n):
  return [next(it)["inputs"].copy() for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_resumes_the_exact_batch_sequence(dataset, workers):
  cfg = cfg_for(dataset, data__workers=workers)
  src = pipeline.make_splits(cfg).train
  it = pipeline.train_iterator(src, cfg)
  first = batches(it, 3)
  state = it.get_state()
  want = batches(it, 4)
  assert first[0].shape == (2, 4, SEQ)
  again = pipeline.train_iterator(src, cfg)
  again.set_state(state)
  got = batches(again, 4)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  if workers:  # same order as the in-process reader
    ref = pipeline.train_iterator(src, cfg_for(dataset))
    for a, b in zip(first, batches(ref, 3)):
      np.testing.assert_array_equal(a, b)
  for i in (it, again):
    getattr(i, "close", lambda: None)()


class IndexSource:
  """Sequence i is filled with i, so a batch shows which sequences it holds."""

  def __len__(self):
    return 40

  def __getitem__(self, i):
    return {"inputs": np.full(SEQ, i, np.int32), "targets": np.full(SEQ, i, np.int32)}


def test_each_process_reads_its_own_shard_once_per_epoch(dataset):
  cfg = cfg_for(dataset, train__grad_accum=1, train__micro_batch=4)
  seen = []
  for p in range(2):  # 20 sequences per process, 2 rows per process per step: one epoch = 10 steps
    it = pipeline.train_iterator(IndexSource(), cfg, process_index=p, process_count=2)
    rows = np.concatenate([next(it)["inputs"][0, :, 0] for _ in range(10)])
    assert sorted(rows) == list(range(p, 40, 2))
    seen.append(rows)
  assert list(seen[0]) != sorted(seen[0])  # shuffled
  with pytest.raises(DataError, match=r"train.micro_batch=4 does not split over 3 processes"):
    pipeline.train_iterator(IndexSource(), cfg, process_index=0, process_count=3)


def test_token_ids_beyond_the_model_vocab(dataset, tmp_path):
  top = max(max(w) for w in stream_windows(dataset))
  with pytest.raises(DataError, match=rf"holds token ids up to {top} but model.vocab_size=200: set "
                                      rf"--config.model.vocab_size >= {top + 1}"):
    pipeline.make_splits(_vocab(dataset, 200))
  # A record whose ids exceed the vocab although the metadata says otherwise is caught when read.
  src = pipeline.make_splits(cfg_for(dataset)).train
  src.vocab_limit = 100
  with pytest.raises(DataError, match=r"holds token id \d+ >= model.vocab_size=100"):
    src[0]


def _vocab(path, v):
  c = cfg_for(path)
  c.model.vocab_size = v
  return c


def _copy(dataset, tmp_path) -> Path:
  dst = tmp_path / "copy"
  shutil.copytree(dataset, dst)
  return dst


@pytest.mark.parametrize("case, message", [
    ("missing", r"does not exist: run python -m efficientllm_jax.data.prepare"),
    ("no_metadata", r"has no metadata.json: it is not a prepared dataset"),
    ("unfinished", r"has no metadata.json: prepare did not finish: re-run the same prepare command"),
    ("corrupt_metadata", r"metadata.json is corrupt \(JSONDecodeError"),
    ("missing_shard", r"lacks 1 train shard\(s\) listed in its metadata"),
    ("truncated_shard", r"the train shards are unreadable|holds \d+ bytes, not 17 x uint16"),
    ("garbage_shard", r"the train shards are unreadable"),
    ("seq_len", r"was prepared with seq_len=16 but data.seq_len=32: set --config.data.seq_len=16"),
    ("no_eval", r"holds no held-out sequences: re-run data.prepare with a larger --eval_fraction"),
    ("no_train", r"holds no training sequences: add data or lower seq_len"),
])
def test_broken_datasets_give_one_clear_line(dataset, tmp_path, case, message):
  d = _copy(dataset, tmp_path)
  cfg = cfg_for(d)
  meta_path = d / records.METADATA
  meta = json.loads(meta_path.read_text())
  shard = d / meta["train"]["shards"][0]["file"]
  if case == "missing":
    cfg = cfg_for(tmp_path / "nope")
  elif case == "no_metadata":
    meta_path.unlink()
    (d / records.PLAN).unlink()
  elif case == "unfinished":
    meta_path.unlink()
  elif case == "corrupt_metadata":
    meta_path.write_text(meta_path.read_text()[:50])
  elif case == "missing_shard":
    shard.unlink()
  elif case == "truncated_shard":
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  elif case == "garbage_shard":
    shard.write_bytes(b"\x00garbage" * 100)
  elif case == "seq_len":
    cfg.data.seq_len = 32
  elif case in ("no_eval", "no_train"):
    meta[case.removeprefix("no_")] = {"shards": [], "sequences": 0, "tokens": 0}
    meta_path.write_text(json.dumps(meta))
  with pytest.raises(DataError, match=message) as e:
    pipeline.make_splits(cfg)
  assert "\n" not in str(e.value)


def test_config_needs_a_path_for_arrayrecord():
  c = base.get_config("tiny")
  c.data.source = "arrayrecord"
  with pytest.raises(config_lib.ConfigError, match=r"data.source='arrayrecord' needs data.path: set "
                                                    r"--config.data.path=DIR"):
    config_lib.validate(c)
  c.data.path, c.data.workers = "/x", -1
  with pytest.raises(config_lib.ConfigError, match=r"data.workers=-1 must be a number >= 0"):
    config_lib.validate(c)
