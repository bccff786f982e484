#!/usr/bin/env bash
# Starts the SoftHSM container outside the test suite (to try `janus keys` against it,
# or to benchmark it) and prints the variables that point p11-kit-client at it.
# Usage: hardware/container/start-token-server.sh [STATE_DIR]   (default .state/container)
#        hardware/container/start-token-server.sh --down [STATE_DIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
cd "$root"
if [ "${1:-}" = --down ]; then
    exec "$python" -m hardware.token_container down "${2:-.state/container}"
fi
bash hardware/container/build-image.sh
exec "$python" -m hardware.token_container up "${1:-.state/container}"
