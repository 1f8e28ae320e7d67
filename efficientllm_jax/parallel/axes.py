"""The mesh axes and the default logical-axis rules table: plain data, without JAX, so that the config files
(configs/base.py) load without it. parallel/sharding.py applies them (and re-exports both names)."""

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Default rules: batch over every data-like axis; FSDP shards the embed dimension of weights (ZeRO-3 style);
# tensor parallelism splits heads and the MLP width (Megatron style); experts over `expert`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("q_lora", None),
    ("kv_lora", None),
)
