"""Embedded corpus, tokenizers and packing."""

import numpy as np
import pytest

from efficientllm_jax.data import corpus, pipeline, tokenizer
from tests.conftest import tiny_config


def test_stdlib_corpus_is_real_and_split_by_file():
  docs = corpus.read_documents(max_mb=1.0)
  assert sum(len(t.encode()) for _, t in docs) >= 1e6
  assert all(rel.endswith(".py") for rel, _ in docs)
  held = {rel for rel, _ in docs if corpus.is_heldout(rel, 0.1)}
  assert 0 < len(held) < len(docs)
  assert corpus.is_heldout(sorted(held)[0], 0.1)  # deterministic


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_tokenizers_round_trip(kind, tmp_path):
  text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
  texts = [t for _, t in corpus.read_documents(max_mb=0.3)]
  tok = tokenizer.get_tokenizer(kind, vocab_size=400, texts=texts, cache_path=tmp_path / "t.json")
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text
  assert tok.token_to_id(tokenizer.EOT) == 0
  if kind == "bytes":
    assert len(ids) == len(text.encode()) and tok.get_vocab_size() == 257
  else:
    assert len(ids) < len(text.encode()) and tok.get_vocab_size() == 400
    again = tokenizer.get_tokenizer(kind, vocab_size=400, texts=[], cache_path=tmp_path / "t.json")
    assert again.encode(text).ids == ids  # served from the cache, not retrained


def test_packed_windows_shift_by_one():
  tokens = np.arange(1, 40, dtype=np.uint32)
  src = pipeline.PackedTokens(tokens, seq_len=8)
  assert len(src) == (39 - 1) // 8
  item = src[2]
  np.testing.assert_array_equal(item["inputs"], np.arange(17, 25))
  np.testing.assert_array_equal(item["targets"], np.arange(18, 26))


def test_batches_are_shaped_for_accumulation_and_eval_is_fixed():
  cfg = tiny_config(**{"train.grad_accum": 2, "train.micro_batch": 3})
  splits = pipeline.make_splits(cfg)
  batch = next(pipeline.train_iterator(splits.train, cfg))
  assert batch["inputs"].shape == (2, 3, cfg.data.seq_len)
  np.testing.assert_array_equal(batch["inputs"][..., 1:], batch["targets"][..., :-1])
  a, b = pipeline.eval_batches(splits.eval, cfg), pipeline.eval_batches(splits.eval, cfg)
  assert len(a) == cfg.train.eval_batches
  np.testing.assert_array_equal(a[0]["inputs"], b[0]["inputs"])


def test_too_little_data_is_one_clear_error():
  cfg = tiny_config(**{"data.seq_len": 1024, "data.max_corpus_mb": 0.2, "train.micro_batch": 1000})
  with pytest.raises(pipeline.DataError, match="fewer than one step needs .* lower data.seq_len"):
    pipeline.make_splits(cfg)


def test_empty_held_out_split_is_one_clear_error():
  cfg = tiny_config(**{"data.seq_len": 2048, "data.max_corpus_mb": 0.1, "data.eval_fraction": 0.001})
  with pytest.raises(pipeline.DataError, match="held-out split holds 0 sequences .* raise data.eval_fraction"):
    pipeline.make_splits(cfg)
