"""Import a Qwen2 / Qwen2.5 Hugging Face checkpoint (safetensors + config.json; no torch) as initial weights.

  python -m efficientllm_jax.tools.import_hf --hf_dir=/models/Qwen2.5-0.5B --out=/ckpt/qwen2.5-0.5b
  python -m launch --config=configs/hf.py:/ckpt/qwen2.5-0.5b --config.data.path=DATA --workdir=runs/ft

CKPT holds params/ (orbax, float32, layers stacked), model_config.json (the config fields the weights fix),
hf_config.json, and the model's tokenizer.json when the HF directory has one (for data.prepare --tokenizer=CKPT).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
from efficientllm_jax.tools import convert
from efficientllm_jax.tools.convert import ConversionError
from efficientllm_jax.train.checkpoint import INIT_MODEL, INIT_PARAMS


def _check_shapes(params: dict, abstract: dict) -> None:
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  if got != want:
    bad = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
    k = bad[0]
    raise ConversionError(f"converted parameter {k} has shape {got.get(k)}, the model expects {want.get(k)}")


def import_checkpoint(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
  """Writes CKPT from an HF directory; returns the model fields (model_config.json)."""
  import orbax.checkpoint as ocp
  hf_dir, out = Path(hf_dir).expanduser(), Path(out).expanduser().resolve()
  if out.exists() and not overwrite:
    raise ConversionError(f"--out={out} already exists: pass --overwrite to replace it or pick another --out")
  hf = convert.read_hf_config(hf_dir)
  fields = convert.fields_from_hf(hf)
  params = convert.hf_to_params(convert.read_safetensors(hf_dir), fields)
  _check_shapes(params, convert.stacked_abstract(convert.config_for(fields)))
  tmp = out.with_name(out.name + ".importing")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
  except OSError as e:
    raise ConversionError(f"cannot write --out={out} ({e.strerror or e}): pick a directory you can write to") from None
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / INIT_PARAMS, params)
  (tmp / INIT_MODEL).write_text(json.dumps(fields, indent=2))
  (tmp / "hf_config.json").write_text(json.dumps(hf, indent=2))
  if (hf_dir / "tokenizer.json").is_file():
    shutil.copy(hf_dir / "tokenizer.json", tmp / "tokenizer.json")
  if out.exists():
    shutil.rmtree(out)
  tmp.rename(out)  # a killed import leaves only the .importing directory
  return fields


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  try:
    fields = import_checkpoint(f.hf_dir, f.out, overwrite=f.overwrite)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  m = fields["model"]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(convert.stacked_abstract(convert.config_for(fields))))
  print(f"wrote {f.out}: {n:,} params (hidden {m['hidden']}, {m['num_layers']} layers, {m['num_heads']}/"
        f"{m['num_kv_heads']} heads, vocab {m['vocab_size']:,})\n"
        f"train from it: python -m launch --config=configs/hf.py:{f.out} --config.data.path=DIR --workdir=RUN")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("hf_dir", None, "Hugging Face model directory: config.json + *.safetensors.")
  flags.DEFINE_string("out", None, "Output directory (an orbax checkpoint plus model_config.json).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.mark_flags_as_required(["hf_dir", "out"])
  app.run(main)
