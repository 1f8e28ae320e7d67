"""data.prepare: packed records against the tokenizers library's own encoding, splits, resume, and bad inputs."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from efficientllm_jax.data import prepare, records, tokenizer as tokenizer_lib
from efficientllm_jax.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]


def random_docs(n: int, seed: int = 0) -> list[str]:
  """Mixed-script documents (ASCII, Latin-1, CJK, emoji, newlines) of varied length."""
  rng = random.Random(seed)
  pools = ["abcdefghij klmnop\n", "éàü ßø", "漢字かな", "😀🚀", "\t{}[]\"\\"]
  return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(5, 300))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
  path.write_text("".join(json.dumps({field: d, "meta": i}) + "\n" for i, d in enumerate(docs)))
  return path


def read_records(out: Path, meta: dict, split: str) -> list[np.ndarray]:
  recs = []
  for shard in meta[split]["shards"]:
    r = ArrayRecordReader(str(out / shard["file"]))
    recs += [np.frombuffer(b, meta["dtype"]).astype(np.int64) for b in r.read_all()]
    r.close()
  return recs


def reference_stream(docs: list[str]) -> np.ndarray:
  """The byte tokenizer run through the tokenizers library (not prepare's table), EOT after each document."""
  tok = tokenizer_lib.byte_tokenizer()
  ids = []
  for d in docs:
    ids += tok.encode(d, add_special_tokens=False).ids + [0]
  return np.asarray(ids)


def opts(**kw) -> prepare.Options:
  return prepare.Options(**{"tokenizer": "bytes", "seq_len": 16, "eval_fraction": 0.0, **kw})


def run(inputs, out, o, **kw) -> dict:
  return prepare.prepare([str(i) for i in inputs], out, o, stream=io.StringIO(), **kw)


def test_byte_table_matches_the_tokenizers_byte_tokenizer():
  text = "".join(random_docs(30, seed=3)) + "".join(chr(c) for c in range(1, 0x800))
  tok = tokenizer_lib.byte_tokenizer()
  want = tok.encode(text, add_special_tokens=False).ids
  got = tokenizer_lib.byte_table(tok)[np.frombuffer(text.encode(), np.uint8)]
  np.testing.assert_array_equal(got, want)


def test_jsonl_records_are_the_packed_token_stream(tmp_path):
  docs = random_docs(60)
  meta = run([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", opts(seq_len=16))
  stream = reference_stream(docs)
  n = (len(stream) - 1) // 16
  recs = read_records(tmp_path / "out", meta, "train")
  assert len(recs) == n == meta["train"]["sequences"] and meta["eval"]["sequences"] == 0
  for k, r in enumerate(recs):  # record k = tokens [16k, 16k + 17): stride seq_len, one token shared
    np.testing.assert_array_equal(r, stream[16 * k: 16 * k + 17])
  assert meta["tokens"] == len(stream) and meta["documents"] == 60
  assert meta["dropped_tokens"] == len(stream) - 1 - 16 * n
  assert meta["max_token_id"] == stream.max() and meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
  assert meta["train"]["tokens"] == 16 * n
  assert (tmp_path / "out" / records.TOKENIZER).is_file()


def test_chunked_units_cut_at_line_starts(tmp_path):
  """Byte-range units each own the lines starting inside them: every document lands in exactly one unit."""
  docs = random_docs(200, seed=1)
  path = write_jsonl(tmp_path / "a.jsonl", docs)
  o = opts(seq_len=8, chunk_mb=(path.stat().st_size // 7 + 1) / 2**20)
  units = prepare.plan_units([path], "auto", o)
  assert len(units) == 7 and units[-1].stop == path.stat().st_size
  got = [d for u in units for d in prepare.iter_documents(u, o)]
  assert got == [d for d in docs if d.strip()]


def test_eval_split_fraction_and_content(tmp_path):
  docs = random_docs(300, seed=2)
  meta = run([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", opts(seq_len=8, eval_fraction=0.25))
  stream = reference_stream(docs)
  total = (len(stream) - 1) // 8
  n_eval = meta["eval"]["sequences"]
  assert meta["train"]["sequences"] + n_eval == total
  assert abs(n_eval - 0.25 * total) < 5 * np.sqrt(0.25 * 0.75 * total)  # binomial, 5 sigma
  windows = Counter(tuple(stream[8 * k: 8 * k + 9]) for k in range(total))
  both = read_records(tmp_path / "out", meta, "eval") + read_records(tmp_path / "out", meta, "train")
  assert Counter(tuple(r) for r in both) == windows  # every window exactly once, in one split or the other


def test_parquet_row_groups_and_field(tmp_path):
  docs = random_docs(90, seed=4)
  table = pa.table({"content": docs, "n": list(range(90))})
  pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
  o = opts(seq_len=16, field="content", chunk_mb=1e-6)  # one unit per row group
  assert len(prepare.plan_units([tmp_path / "a.parquet"], "auto", o)) == 9
  meta = run([tmp_path / "a.parquet"], tmp_path / "out", o)
  want = sum((len(reference_stream(docs[g:g + 10])) - 1) // 16 for g in range(0, 90, 10))
  assert meta["train"]["sequences"] == want and meta["documents"] == 90


def test_text_files_one_document_per_file_or_per_line(tmp_path):
  (tmp_path / "in").mkdir()
  docs = random_docs(5, seed=5)
  for i, d in enumerate(docs):
    (tmp_path / "in" / f"{i}.txt").write_text(d)
  meta = run([tmp_path / "in"], tmp_path / "o1", opts(seq_len=4))
  assert meta["documents"] == sum(1 for d in docs if d.strip())
  lines = [ln for d in docs for ln in d.split("\n") if ln.strip()]
  meta = run([tmp_path / "in"], tmp_path / "o2", opts(seq_len=4, text_unit="line"))
  assert meta["documents"] == len(lines)


def test_hf_tokenizer_json(tmp_path):
  docs = random_docs(80, seed=6)
  tok = tokenizer_lib.train_bpe(docs, 300)
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  meta = run([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", opts(tokenizer=str(tmp_path / "tok")))
  ids = []
  for d in docs:
    ids += tok.encode(d, add_special_tokens=False).ids + [tok.token_to_id(tokenizer_lib.EOT)]
  recs = read_records(tmp_path / "out", meta, "train")
  np.testing.assert_array_equal(np.concatenate([r[:-1] for r in recs]), ids[:16 * len(recs)])
  assert meta["vocab_size"] == 300


def test_workers_give_identical_shards(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", random_docs(200, seed=7))
  o = opts(seq_len=8, eval_fraction=0.1, chunk_mb=(path.stat().st_size // 4 + 1) / 2**20)
  m1 = run([path], tmp_path / "o1", o, workers=1)
  m2 = run([path], tmp_path / "o2", o, workers=2)
  assert m1["train"] == m2["train"] and m1["eval"] == m2["eval"]
  for s in m1["train"]["shards"] + m1["eval"]["shards"]:
    assert (tmp_path / "o1" / s["file"]).read_bytes() == (tmp_path / "o2" / s["file"]).read_bytes()


def test_resume_skips_finished_units_and_refuses_to_overwrite(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", random_docs(200, seed=8))
  o = opts(seq_len=8, chunk_mb=(path.stat().st_size // 4 + 1) / 2**20)
  out = tmp_path / "out"
  full = run([path], out, o)
  shard0 = (out / "train-00000.arrayrecord").read_bytes()
  with pytest.raises(DataError, match="already holds a prepared dataset: pass --overwrite"):
    run([path], out, o)
  # A kill after unit 0 finished: the others unfinished (a .tmp shard left behind), no metadata yet.
  n = full["units"]
  assert n == 4
  for i in range(1, n):
    (out / records.stats_name(i)).unlink()
    (out / records.shard_name("train", i)).rename(out / f".{records.shard_name('train', i)}.tmp")
  (out / records.METADATA).unlink()
  (out / "train-00000.arrayrecord").write_bytes(b"sentinel")  # proves unit 0 is not redone
  err = io.StringIO()
  resumed = prepare.prepare([str(path)], out, o, stream=err)
  assert f"resuming, 1 of {n} units already done" in err.getvalue()
  assert (out / "train-00000.arrayrecord").read_bytes() == b"sentinel"
  assert resumed["train"] == full["train"]
  with pytest.raises(DataError, match="unfinished prepare of different inputs"):
    (out / records.METADATA).unlink()
    run([path], out, opts(seq_len=9))
  meta = run([path], out, o, overwrite=True)
  assert (out / "train-00000.arrayrecord").read_bytes() == shard0 and meta["train"] == full["train"]


@pytest.mark.parametrize("case, message", [
    ("missing", "matches no file"),
    ("bad_json", r"a.jsonl \(byte 0\): not a JSON line"),
    ("no_field", r"no 'text' field \(found: body\): pass --field=NAME"),
    ("not_utf8", r"is not UTF-8 text"),
    ("bad_tokenizer", r"tokenizer '.*nope' not found"),
    ("no_eot", r"has no '<\|endoftext\|>' token to separate documents: pass --eot=TOKEN"),
    ("parquet_column", r"no 'text' column \(found: body\)"),
    ("not_parquet", r"is not a readable parquet file"),
    ("too_short", r"not one training sequence of --seq_len=100000"),
    ("not_empty", r"is not empty: pick an empty or new directory"),
    ("unwritable", r"cannot write --out="),
])
def test_bad_inputs_give_one_clear_line(tmp_path, case, message):
  inp, o, out = tmp_path / "a.jsonl", opts(), tmp_path / "out"
  write_jsonl(inp, ["hello world"] * 20)
  if case == "missing":
    inp = tmp_path / "nothing.jsonl"
  elif case == "bad_json":
    inp.write_text("{not json}\n")
  elif case == "no_field":
    inp.write_text(json.dumps({"body": "x"}) + "\n")
  elif case == "not_utf8":
    inp = tmp_path / "a.txt"
    inp.write_bytes(b"ok \xff\xfe bad")
  elif case == "bad_tokenizer":
    o = opts(tokenizer=str(tmp_path / "nope"))
  elif case == "no_eot":
    tok = tokenizer_lib.train_bpe(["abc"], 270)
    tok.save(str(tmp_path / "t.json"))
    from tokenizers import Tokenizer
    t2 = Tokenizer.from_str(tok.to_str().replace(tokenizer_lib.EOT, "<eos>"))
    t2.save(str(tmp_path / "t.json"))
    o = opts(tokenizer=str(tmp_path / "t.json"))
  elif case == "parquet_column":
    inp = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), inp)
  elif case == "not_parquet":
    inp = tmp_path / "a.parquet"
    inp.write_text("not parquet")
  elif case == "too_short":
    o = opts(seq_len=100_000)
  elif case == "not_empty":
    out.mkdir()
    (out / "notes.txt").write_text("mine")
  elif case == "unwritable":
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
  with pytest.raises(DataError, match=message) as e:
    run([inp], out, o)
  assert "\n" not in str(e.value)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  r = subprocess.run([sys.executable, "-m", "efficientllm_jax.data.prepare", f"--input={tmp_path / 'a.jsonl'}",
                      f"--out={tmp_path / 'out'}", "--seq_len=8"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "pass --field=NAME" in r.stderr
