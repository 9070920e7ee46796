#!/usr/bin/env bash
# Install qblock and run the main job on a scratch image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/qblock demo "$@"
