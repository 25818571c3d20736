#!/usr/bin/env bash
# The serving benchmark of docs/serving.md in one run: the in-flight engine in process, then through Triton
# (llama-serve), then llama.cpp's llama-server on the same checkpoint, in turn; JSON reports in OUT.
#   examples/serve_bench_all.sh ARTIFACT GGUF LLAMA_SERVER OUT
# ARTIFACT: a static-cache artifact (gqa-mid: see docs/serving.md); GGUF: the same checkpoint converted by
# llama.cpp's convert_hf_to_gguf.py; LLAMA_SERVER: llama.cpp's llama-server binary.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 4 ]; then sed -n 2,6p "$0" >&2; exit 2; fi
A=$1 GGUF=$2 S=$3 O=$4
mkdir -p "$O"
date -u +%FT%TZ > "$O/start"
.venv/bin/llama-load-bench "$A" --concurrency 1,4,8,16 --requests 16 --slots 16 --threads 2 --no-sequential --json \
    > "$O/inproc.json" 2> "$O/inproc.err"
.venv/bin/llama-serve "$A" --slots 16 --queue 64 --threads 2 --json > "$O/serve.out" 2> "$O/serve.err" &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null' EXIT  # a failed run leaves no server behind
for _ in $(seq 120); do [ -s "$O/serve.out" ] && break; sleep 1; done
GRPC=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['grpc'])" "$O/serve.out")
PID=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$O/serve.out")
.venv/bin/python examples/serve_bench.py triton "$GRPC" --clients 1,4,8,16 --requests 16 --server-pid "$PID" \
    --rss-requests 500 --rss-new-tokens 8 --json > "$O/triton.json" 2> "$O/triton.err"
kill -TERM "$SERVE"; wait "$SERVE"
"$S" -m "$GGUF" -t 2 -tb 2 -np 16 -c 8192 --host 127.0.0.1 --port 18080 > "$O/llama-server.log" 2>&1 &
LP=$!
trap 'kill $LP 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf http://127.0.0.1:18080/health > /dev/null && break; sleep 1; done
.venv/bin/python examples/serve_bench.py openai http://127.0.0.1:18080/v1 --clients 1,4,8,16 --requests 16 \
    --server-pid "$LP" --rss-requests 500 --rss-new-tokens 8 --json > "$O/llama-cpp.json" 2> "$O/llama-cpp.err"
date -u +%FT%TZ > "$O/end"
