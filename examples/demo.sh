#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the built-in `tiny` model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
.venv/bin/llama-reference --model tiny --prompt "${1:-A list comprehension}" --max-new-tokens 48
