"""Tokenizers from the `tokenizers` library: a byte-level BPE trained on the corpus (cached), or plain bytes.

Both use the GPT-2 byte-level alphabet, so any text round-trips; id 0 is the end-of-text separator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def byte_tokenizer() -> Tokenizer:
  """256 byte symbols plus EOT (id 0): no merges."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {EOT: 0} | {ch: i + 1 for i, ch in enumerate(sorted(alphabet))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  _byte_level(tok)
  tok.add_special_tokens([EOT])
  return tok


def _byte_level(tok: Tokenizer) -> None:
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  _byte_level(tok)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok


def get_tokenizer(kind: str, *, vocab_size: int, texts: list[str], cache_path: Path | None) -> Tokenizer:
  """`bytes`, or `bpe` trained on `texts` and cached at `cache_path` (re-used when present)."""
  if kind == "bytes":
    return byte_tokenizer()
  if cache_path is not None and cache_path.exists():
    return Tokenizer.from_file(str(cache_path))
  tok = train_bpe(texts, vocab_size)
  if cache_path is not None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(cache_path)  # atomic: a concurrent reader never sees half a file
  return tok


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map (the ByteLevel alphabet): printable Latin-1 bytes map to themselves,
  the other 68 bytes to the characters from U+0100 upward, in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  out, extra = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in out:
      out[b] = chr(256 + extra)
      extra += 1
  return out


def byte_table(tok: Tokenizer) -> np.ndarray:
  """[256] ids: the byte tokenizer's id of each raw byte, so UTF-8 bytes map to ids with one numpy gather."""
  vocab = tok.get_vocab()
  return np.asarray([vocab[ch] for _, ch in sorted(bytes_to_unicode().items())], dtype=np.uint32)


def load(spec: str) -> Tokenizer:
  """`bytes` (the built-in byte-level tokenizer) or a Hugging Face tokenizer.json, given as the file or its directory.

  Raises FileNotFoundError / ValueError with a one-line message."""
  if spec == "bytes":
    return byte_tokenizer()
  path = Path(spec).expanduser()
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer {spec!r} not found: pass 'bytes' or a tokenizer.json (or its directory)")
  try:
    return Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on a malformed file
    raise ValueError(f"tokenizer {str(path)!r} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
