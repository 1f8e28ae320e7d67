"""Every position kind trains the tiny model end to end with a falling loss.

RoPE, the base config's scheme, is not trained again here: its tiny preset is GQA tiny exactly (checked below), which
test_attention.test_tiny_trains_with_falling_loss[gqa] trains with this file's loss checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import load_config_file, train_config_file

KINDS = ("sinusoidal", "learned", "relative", "alibi", "none")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_tiny(kind, tmp_path):
  summary, rows = train_config_file(f"configs/positional/{kind}.py", tmp_path)
  assert summary["position"] == kind
  losses = [row["loss"] for row in rows if row.get("split") == "train" and "loss" in row]
  assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


def test_rope_tiny_is_the_gqa_tiny_that_test_attention_trains():
  rope = load_config_file("configs/positional/rope.py", "tiny").to_dict()
  assert rope["position"]["kind"] == "rope"
  assert rope == load_config_file("configs/attention/gqa.py", "tiny").to_dict()
