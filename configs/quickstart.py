"""The `make demo` run: the tiny GQA model on the embedded stdlib corpus, CPU-sized (about a minute)."""

from configs import base


def get_config(arg: str = "tiny"):
  c = base.get_config(arg)
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 50
  return c
