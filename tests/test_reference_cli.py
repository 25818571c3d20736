"""`llama-reference`: generation with the reference model from the command line, and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llama_export.exporter.loading import load_model
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.reference_generate import generate
from llama_export.runtime.tokenizer import LlamaTokenizer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_export.exporter.reference_cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generates_the_greedy_continuation_of_tiny():
    tok = LlamaTokenizer(TINY_DIR / "tokenizer.model")
    prompt = "A list comprehension"
    ids = tok.encode(prompt)
    expected = tok.decode(ids + list(generate(load_model(resolve_checkpoint("tiny")), ids, 20, tok.eos_id)))
    out = run("--prompt", prompt, "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == expected
    assert "5.0 M parameters" in out.stderr and "20 tokens" in out.stderr


def test_chat_mode_and_help():
    out = run("--chat", "--system", "Be brief.", "--prompt", "What is a tuple?", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    help_text = run("--help").stdout
    for flag in ("--model", "--checkpoint", "--random-weights", "--fp16", "--chat", "Examples"):
        assert flag in help_text


@pytest.mark.parametrize("args, message", [
    (["--model", "8b"], "unknown model '8b'"),
    (["--model", "7b"], "not in the local Hugging Face cache"),
    (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt: checkpoint directory not found"),
    (["--chat", "--prompt", "[INST] x"], r"contains one of [INST]"),
    (["--model", "7b", "--random-weights"], "no tokenizer.model found for '7b'; pass --tokenizer"),
])
def test_bad_input_exits_non_zero_with_a_message(args, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_flag_value():
    out = run("--temperature", "-1")
    assert out.returncode == 2 and "--temperature" in out.stderr

