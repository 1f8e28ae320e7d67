"""Data: tokenizer, embedded corpus, grain pipeline (later: prepare -> ArrayRecord)."""
