"""Flag parsing for entry points that import their heavy modules (JAX, grain, orbax, ...) only when they run.

Some of those libraries define absl flags of their own on import (grain's --grain_*, array_record's, orbax's), and a
command line could name one. So the heavy modules are imported before parsing whenever the command line might name
a flag this process has not defined yet (or asks for --helpfull / --helpxml, or reads a --flagfile): every command
line then parses exactly as it did when they were imported at the top, and help, a flag error or a usage error
come back without the second of imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import flags

_NEED_ALL_FLAGS = ("helpfull", "helpxml", "flagfile")


def may_name_undefined_flag(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> bool:
  """True when an argument of argv[1:] may name a flag not (yet) defined in `fv`. `--name.sub` (ml_collections'
  --config.key overrides) counts as a flag of `name`."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("-") or arg == "-":
      continue
    name = arg.lstrip("-").partition("=")[0].partition(".")[0]
    if name in _NEED_ALL_FLAGS:
      return True
    if name not in fv and not (name.startswith("no") and name[2:] in fv):
      return True
  return False


def importing_first(import_heavy: Callable[[], object], parse: Callable[[list[str]], list[str]],
                    fv: flags.FlagValues = flags.FLAGS) -> Callable[[list[str]], list[str]]:
  """An app.run flags_parser: `import_heavy()` first when argv may name a flag those imports define, then `parse`."""

  def parser(argv: list[str]) -> list[str]:
    if may_name_undefined_flag(argv, fv):
      import_heavy()
    return parse(argv)

  return parser
