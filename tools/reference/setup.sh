#!/usr/bin/env bash
# Creates the Python environment that generates the reference fixtures (tests never need it).
# Usage: tools/reference/setup.sh [VENV_DIR]   (default: tools/reference/.venv)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
echo "reference environment ready: $venv"
