"""Shared by the serving tests: tiny exported with a static cache, `llama-serve` started as users start it (the
real tritonserver on 127.0.0.1, free ports) and stopped by pid, the runtime's solo generation as the reference."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.generation import generate
from llama_export.runtime.sampling import SamplingParams
from llama_export.runtime.tokenizer import LlamaTokenizer


WINDOW = 512  # long enough that a request outlives the client cancelling it, even on a loaded machine
SHM = "/dev/shm/triton_python_backend_shm_region_*"
BIN = Path(sys.executable).parent


def export_tiny_static(directory: Path) -> Path:
    """tiny, fp32, static cache of WINDOW slots (LLAMA_EXPORT_TEST_SERVING_ARTIFACT: reuse one, when iterating)."""
    reuse = os.environ.get("LLAMA_EXPORT_TEST_SERVING_ARTIFACT")
    if reuse:
        return Path(reuse)
    out = directory / "tiny-static"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions(kv_cache="static", max_seq_len=WINDOW),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The served tiny artifact (a module's tests share it)."""
    return export_tiny_static(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def reference(artifact):
    return Reference(artifact)


class Reference:
    """llama-generate's own path (runtime.generation, one prompt alone) on the same artifact."""

    def __init__(self, artifact_dir: Path):
        self.artifact = Artifact.open(artifact_dir)
        self.tokenizer = LlamaTokenizer(self.artifact.tokenizer_path)
        self.backend = open_backend(self.artifact, "ort", 1)

    def ids(self, prompt_ids: list[int], max_new_tokens: int, params=SamplingParams(), stop=(), ignore_eos=False):
        return generate(self.backend, self.tokenizer, [prompt_ids], self.artifact.max_length, max_new_tokens, params,
                        stop_strings=stop, ignore_eos=ignore_eos)[0]

    def __call__(self, prompt: str, max_new_tokens: int, params=SamplingParams(), stop=(), ignore_eos=False):
        return self.ids(self.tokenizer.encode(prompt), max_new_tokens, params, stop, ignore_eos)


class Served:
    """`llama-serve SOURCE --json ...` running; `endpoints` from its JSON line; `stop()` by pid."""

    def __init__(self, source: Path, *args: str, timeout: float = 120):
        self.shm_before = set(glob.glob(SHM))
        self.process = subprocess.Popen([str(BIN / "llama-serve"), str(source), "--json", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            err = self.process.stderr.read()
            self.process.wait(30)
            raise RuntimeError(f"llama-serve exited {self.process.returncode}: {err}")
        self.endpoints = json.loads(line)
        self.server_pid = self.endpoints["pid"]
        self.http = self.endpoints["http"]

    def metrics(self) -> dict[str, float]:
        """The llama_* samples of Triton's metrics endpoint, keyed by their text before the value."""
        text = httpx.get(self.endpoints["metrics"], timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("llama_")}

    def wait_metric(self, key: str, predicate, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(key, 0.0)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def ready(self) -> bool:
        return httpx.get(f"{self.http}/v2/health/ready", timeout=5).status_code == 200

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM to llama-serve; its exit status. Kills whatever is left (by pid) so nothing leaks."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if pid_alive(self.server_pid):
            os.kill(self.server_pid, signal.SIGKILL)
        self.stderr = self.process.stderr.read()
        return self.process.returncode

    def leftover_shm(self) -> set[str]:
        return orphaned_shm(self.shm_before)


def orphaned_shm(before: set[str]) -> set[str]:
    """Python-backend segments made since `before` that no process maps (another server's live ones are mapped)."""
    from llama_export.runtime.serving.server import mapped_paths

    return set(glob.glob(SHM)) - before - mapped_paths()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of a parent that has not reaped it yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def sse_events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
