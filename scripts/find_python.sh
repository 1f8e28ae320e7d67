#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or explains on stderr and exits 1.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for c in "${PYTHON:-}" python3.12 python3.13 python3 python; do
  [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && ok "$c" && { command -v "$c"; exit 0; }
done
# pyenv installs versions that its shims only expose when selected.
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for c in "$root"/versions/3.1[2-9]*/bin/python3; do
  [ -x "$c" ] && ok "$c" && { echo "$c"; exit 0; }
done
echo "error: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
