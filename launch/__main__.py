"""One training run: python -m launch --config=configs/base.py:tiny --workdir=runs/x [--config.train.steps=50]."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import lazy_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py:tiny", "Config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, tb/, summary.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move an earlier run in --workdir aside instead of refusing.")
flags.mark_flags_as_required(["workdir"])


def _import_training():
  """The training stack (JAX, Flax, grain, orbax, ...): imported when a run starts, not for help or a flag error."""
  from efficientllm_jax import config as config_lib
  from efficientllm_jax.data.pipeline import DataError
  from efficientllm_jax.parallel import distributed
  from efficientllm_jax.tools.convert import ConversionError
  from efficientllm_jax.train.checkpoint import CheckpointError
  from efficientllm_jax.train.loop import TrainingDiverged, WorkdirError, train_and_evaluate

  user_errors = (config_lib.ConfigError, DataError, WorkdirError, TrainingDiverged, CheckpointError, ConversionError)
  return distributed.initialize, train_and_evaluate, user_errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  initialize, train_and_evaluate, user_errors = _import_training()
  try:
    initialize(_CONFIG.value)  # before anything touches a device
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=lazy_flags.importing_first(_import_training, app.parse_flags_with_usage))
