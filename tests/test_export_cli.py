"""`llama-export` checks checkpoints: good ones pass, bad ones exit 2 naming the file and the fix."""

from __future__ import annotations

import subprocess
import sys

import torch

from exporter.checkpoint import RandomCheckpoint
from conftest import small_config, state_dict, write_safetensors_checkpoint


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, timeout=300)


def test_checks_tiny_and_a_directory(tmp_path):
    out = run("--model", "tiny")
    assert out.returncode == 0 and "checkpoint OK" in out.stdout and "heads 8 (key/value 4)" in out.stdout
    config = small_config()
    d = write_safetensors_checkpoint(tmp_path / "ok", config, state_dict(RandomCheckpoint(config)))
    out = run("--model", str(d))
    assert out.returncode == 0, out.stderr


def test_bad_checkpoint_exits_2(tmp_path):
    config = small_config()
    weights = state_dict(RandomCheckpoint(config))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    d = write_safetensors_checkpoint(tmp_path / "bad", config, weights)
    out = run("--checkpoint", str(d))
    assert out.returncode == 2
    assert "model.layers.0.mlp.up_proj.weight' has dtype torch.int8" in out.stderr and "Traceback" not in out.stderr
