"""JAX / Flax settings that must hold before anything compiles or builds a model.

Imported by every module that uses JAX or Flax (the kernels, models and train packages in their __init__, the
other modules themselves), not by the package's __init__: the command lines (`python -m launch --help`, a flag
error, `launch.bench --dry_run`, `launch.slurm`, `launch.bench tables`) and the config files then answer without
loading JAX, Flax or Pallas (about a second of imports in each such process).
"""

import flax
# Imported for its side effect, before anything compiles: it registers a JAX config option that is part of every
# jit cache key (`pallas_fuser_disable_nested_fuse`). Pallas imports it lazily while tracing the first kernel, so
# without this the key changed after the first train step and every jitted function compiled a second time (the
# 0.5B train step on an H200: 20-28 s more in its first steps; tests/test_train.py checks one compile).
import jax.experimental.pallas.fuser  # noqa: F401

# Parameters carry *logical* axis names (vocab, embed, heads, ...) that parallel/ maps to mesh axes through the
# config's rules table; Flax's eager sharding would read them as mesh axes, so it stays off.
flax.config.update("flax_always_shard_variable", False)
