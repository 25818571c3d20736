#!/usr/bin/env bash
# The README's first command: set up, export the built-in `tiny` model to ONNX (checked in ONNX Runtime
# against PyTorch), then generate text from the artifact with the ONNX Runtime backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh export
.venv/bin/llama-export --model tiny --fp32 -o out/tiny-float32 --force
.venv/bin/llama-generate out/tiny-float32 --prompt "${1:-A list comprehension}" --max-new-tokens 48
