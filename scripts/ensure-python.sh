#!/usr/bin/env bash
# Make sure a Python >= 3.11 with venv and pip exists; install Debian's when missing.
set -euo pipefail
need_apt=()
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then need_apt+=(python3 python3-venv python3-pip); fi
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
"$PY" - <<'PYEOF'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Tally needs Python 3.11 or newer, found {sys.version.split()[0]}")
PYEOF
