"""Calibration text → token sequences for SmoothQuant (the graph pass runs them in ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_export.runtime.tokenizer import LlamaTokenizer

from .errors import ExportError
from .presets import TINY_DIR

DEFAULT_TEXT = TINY_DIR / "heldout.txt"  # 200 KB of English technical prose (the Python documentation)


def sequences(tokenizer: Path | None, text: Path, tokens: int, length: int) -> list[np.ndarray]:
    """`tokens` tokens of `text` as [bos] + chunks, each int64 [1, ≤ length]."""
    if tokenizer is None:
        raise ExportError("--smoothquant calibrates on text and needs a tokenizer: pass --tokenizer PATH")
    if tokens < 1:
        raise ExportError(f"--calibration-tokens must be ≥ 1 (got {tokens})")
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"cannot read the calibration text {text}: {err}; pass --calibration PATH to a "
                          f"UTF-8 text file") from None
    tok = LlamaTokenizer(tokenizer)
    ids = tok.encode(content[: tokens * 16], add_bos=False)[:tokens]
    if len(ids) < tokens:
        raise ExportError(f"the calibration text {text} has only {len(ids)} tokens; --calibration-tokens asks "
                          f"for {tokens}: pass a longer text or fewer tokens")
    step = length - 1
    return [np.array([[tok.bos_id, *ids[i:i + step]]], np.int64) for i in range(0, len(ids), step)]
