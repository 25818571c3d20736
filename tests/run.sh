#!/usr/bin/env bash
# The README's test command: set up (with the test extras), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh test
exec .venv/bin/python -m pytest "$@"
