#!/usr/bin/env bash
# Create ./.venv (once) and install llama-export into it with the given extras, e.g. `examples/setup.sh test`.
# Without extras: the torch-free runtime (run artifacts). With export, test or trt: torch too, pinned to 2.13.0,
# its CPU wheel installed first so that nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${LLAMA_EXPORT_VENV:-.venv}"
torch_first=false
case ",$extras," in *,export,*|*,test,*|*,trt,*) torch_first=true ;; esac
stamp="$venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    python3 -m venv "$venv"
fi
if [ ! -e "$stamp" ]; then
    log="$venv/install.log"
    echo "setup: installing llama-export${extras:+[$extras]} into $venv (first run only; log: $log)" >&2
    if ! { "$venv/bin/python" -m pip install --upgrade pip \
           && { [ "$torch_first" = false ] || "$venv/bin/python" -m pip install "torch==2.13.0"; } \
           && "$venv/bin/python" -m pip install -e ".${extras:+[$extras]}"; } > "$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "setup: installation failed; the full log is $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
