"""One tritonserver process: found, started on 127.0.0.1 with free or given ports, waited for, stopped cleanly.

The server is `tritonserver` on PATH, else the one in the nvidia-pytriton wheel (2.51 with the Python backend);
for the wheel the Python stub of this Python is copied into the wheel's own `backends/python/` once, where its
RPATH finds the wheel's libraries. Readiness is polled with a timeout, because a model whose Python stub cannot
start makes the server wait forever. Stopping is SIGTERM and a wait: the server lets in-flight streams finish
(an exit timeout of EXIT_TIMEOUT_S, longer than the default: a short one crashes 2.51 with streams in flight, and
past it the server exits 1; llama-serve drains the models before it signals, so this is the bound for servers
whose models do not drain), and the Python backend's shared-memory segments that a killed server leaves in
/dev/shm are removed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SHM_GLOB = "/dev/shm/triton_python_backend_shm_region_*"


class ServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_tritonserver() -> tuple[Path, Path | None]:
    """The server binary and, for the nvidia-pytriton wheel's, its backend directory (with this Python's stub)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    try:
        import pytriton
    except ImportError:
        raise ServerError("no tritonserver: put one on PATH or install the serve extra "
                          "(pip install 'llama-export[serve]', which brings the nvidia-pytriton wheel's)") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    binary, backends = root / "bin" / "tritonserver", root / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise ServerError(f"{root}: the nvidia-pytriton wheel has no tritonserver or no Python {version} stub")
    installed = backends / "python" / stub.name
    if not installed.is_file() or installed.stat().st_size != stub.stat().st_size:
        tmp = installed.with_suffix(".tmp")
        shutil.copy2(stub, tmp)
        os.replace(tmp, installed)
    return binary, backends


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment (with `extra`): this Python's libpython first on the loader's path, so that the stub
    embeds the same Python as the venv recorded in the repository's EXECUTION_ENV_PATH."""
    env = {**os.environ, **(extra or {})}
    lib = Path(sys.base_prefix) / "lib"
    if list(lib.glob("libpython3*.so*")):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    return env


def mapped_paths() -> set[str]:
    """Files mapped by any process now (to leave other servers' shared memory alone)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


def reason_from_log(text: str) -> str:
    """The server's own words for a failed start: its error lines, else its last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if (re.match(r"^E\d{4} ", ln) or "failed to load" in ln or "UNAVAILABLE" in ln)
              and "CudaDriverHelper" not in ln]  # that one is said on every CPU-only start
    picked = errors or lines[-15:]
    return "\n".join(picked[-15:]) if picked else "(the server wrote nothing)"


@dataclass
class Endpoints:
    host: str
    http: int
    grpc: int
    metrics: int

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics}/metrics"


EXIT_TIMEOUT_S = 90  # in-flight requests get this long to finish after SIGTERM (Triton's default, 30 s, is short on
# a loaded CPU); below stop()'s grace, so the server ends them itself rather than being killed


class TritonServer:
    """`start()`, `wait_ready(timeout)`, `stop()`; the log goes to `log_path`."""

    def __init__(self, repository: Path, log_path: Path, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.repository, self.log_path = Path(repository).resolve(), Path(log_path)
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host),
                                   metrics_port or free_port(host))
        self.extra_args, self.extra_env, self.process = tuple(extra_args), dict(env or {}), None
        self._shm_before: set[str] = set()

    def command(self) -> list[str]:
        binary, backends = find_tritonserver()
        e = self.endpoints
        cmd = [str(binary), f"--model-repository={self.repository}",
               f"--http-address={e.host}", f"--http-port={e.http}",
               f"--grpc-address={e.host}", f"--grpc-port={e.grpc}",
               f"--metrics-address={e.host}", f"--metrics-port={e.metrics}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-on-error=true",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        return cmd + list(self.extra_args)

    def start(self) -> None:
        cmd = self.command()
        self._shm_before = set(glob.glob(SHM_GLOB))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # a session of its own: a Ctrl-C in the terminal reaches llama-serve, which stops the server in order
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=server_env(self.extra_env), start_new_session=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Return when the server is ready; else stop it and raise ServerError with the server's reason."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ServerError(f"tritonserver exited ({code}) before it was ready:\n{reason_from_log(self.log_text())}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop(grace=10)
        raise ServerError(f"tritonserver was not ready within {timeout:g} s (a model still loading, or its Python "
                          f"stub could not start); stopped it. Its log ({self.log_path}):\n"
                          f"{reason_from_log(self.log_text())}")

    def terminate(self) -> None:
        """SIGTERM: the server stops taking requests, waits for those in flight, unloads the models and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 120.0) -> int | None:
        """SIGTERM, wait up to `grace` s for in-flight requests to finish, else SIGKILL; then the shm cleanup."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # the Python stubs live in the server's session; none may outlive it
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.remove_leftover_shm()
        return self.process.returncode

    def remove_leftover_shm(self) -> list[str]:
        new = set(glob.glob(SHM_GLOB)) - self._shm_before
        if not new:
            return []
        mapped = mapped_paths()
        removed = [p for p in sorted(new) if p not in mapped]
        for path in removed:
            try:
                os.unlink(path)
            except OSError:
                pass
        return removed
