"""Checkpoint → reference PyTorch model → ONNX artifact.

Needs the `export` extra (torch, the checkpoint readers, the graph passes): the base install runs artifacts only.
Without it, the export commands end with one line saying how to install it; an import from Python raises
ImportError with the same line.
"""

import importlib.util
import sys
from pathlib import Path

EXPORT_MODULES = ("torch", "safetensors", "huggingface_hub", "onnxscript", "onnx_ir", "ml_dtypes", "polygraphy")
COMMANDS = ("llama-export", "llama-build", "llama-reference", "llama-parity")


_MISSING = [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]

if _MISSING:
    _message = (f"exporting needs the export extra ({', '.join(_MISSING)} not installed): "
                f"pip install 'llama-export[export]' (running an artifact needs only the base install)")
    _argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if _argv0.name in COMMANDS or _argv0.parent == Path(__file__).parent:  # a command, not a library import
        print(f"error: {_message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_message)
