#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU and TensorRT 11: set up, then prove the TensorRT stage.
#
#   examples/gpu_check.sh                 # everything (tests/test_tensorrt_gpu.py), log in gpu_check.log
#   examples/gpu_check.sh -k parser       # a subset (arguments go to pytest)
#
# What it runs (tests/test_tensorrt_gpu.py, about 10 minutes on an H100/H200 after the install):
# - TensorRT's own ONNX parser on every tiny trt graph (fp32, fp16, bf16, --int8, --int8 --smoothquant,
#   --kv-cache static), each of which graphs/trt_check.py passes, and on the old fp16 graph it refuses;
# - tiny fp16, int8 and static-cache engines: prefill + 16 greedy steps against PyTorch fp32;
# - fp32 engines (attention built decomposable: no fused fp32 kernel) against transformers' greedy tokens;
# - the CUDA-graph decode path, and a replay after another prefill ran on the same context;
# - llama-bench --backend trt on a Llama-2-7B-shaped 2-layer random model, with its HBM bandwidth fraction.
# Exit status: pytest's; 3 when there is no GPU or TensorRT 11 does not import after the install.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLAMA_EXPORT_VENV="${LLAMA_EXPORT_VENV:-.venv-gpu}"  # a venv of its own: the CPU one pins no CUDA build
export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://pypi.nvidia.com}"  # TensorRT's wheels live there

if ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi: $gpu)" >&2
    exit 3
fi
echo "gpu_check: $gpu" >&2
bash examples/setup.sh test,trt
python="$LLAMA_EXPORT_VENV/bin/python"
"$python" - <<'PY'
import sys

import torch
from llama_export.exporter.trt_build import tensorrt_status

status = tensorrt_status()
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}); {status.reason}", file=sys.stderr)
sys.exit(0 if status.usable else 3)
PY
started=$(date +%s)
set +e
timeout 900 "$python" -m pytest tests/test_tensorrt_gpu.py -n 0 -v -s -rs -p no:cacheprovider "$@" 2>&1 \
    | tee gpu_check.log
status=${PIPESTATUS[0]}
set -e
echo "gpu_check: tests finished with status $status in $(( $(date +%s) - started )) s; log: gpu_check.log" >&2
exit "$status"
