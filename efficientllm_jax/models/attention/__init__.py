"""Attention variants, one file per kind; `make_attention` maps `attention.kind` to its module."""

from efficientllm_jax.models.attention.gqa import GQAAttention
from efficientllm_jax.models.attention.mla import MLA
from efficientllm_jax.models.attention.nsa import NSAAttention

ATTENTIONS = {"mha": GQAAttention, "gqa": GQAAttention, "mqa": GQAAttention, "mla": MLA, "nsa": NSAAttention}


def make_attention(cfg, *, rngs):
  return ATTENTIONS[cfg.attention.kind](cfg, rngs=rngs)
