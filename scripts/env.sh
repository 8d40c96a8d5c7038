#!/usr/bin/env bash
# Usage: scripts/env.sh [--torch] COMMAND [ARGS...]
# Creates .venv (Python 3.11) on first use, installs requirements.txt (and torch==2.13.0, the CPU
# reference used only by tests and benchmarks, with --torch), then runs COMMAND inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
want_torch=0
if [[ "${1:-}" == "--torch" ]]; then want_torch=1; shift; fi
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
sum=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat $stamp)" != "$sum" ]]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$sum" > $stamp
fi
if [[ $want_torch == 1 ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
export PATH="$PWD/.venv/bin:$PATH"
exec "$@"
