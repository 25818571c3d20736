"""`llama-serve`: tritonserver on a model repository (or an artifact, through a repository written for it), ready
or a clear error within a timeout, the endpoints printed, stopped cleanly on Ctrl-C / SIGTERM; with `--openai
PORT` an OpenAI-compatible endpoint in this process, forwarding to the server over gRPC streaming.

Stopping: the models are told first, through a stop file in a directory named in the server's environment
(`interface.STOP_DIR_ENV`): they refuse new requests, give the open ones until `--drain-timeout` to finish and cancel
the rest, and report when none is left; then the OpenAI endpoint closes and tritonserver gets SIGTERM, with nothing
in flight. The reports (how many requests were open, how they ended, how long the model took to finalize) are
printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from . import interface
from .repository import RepositoryError, write_repository
from .server import EXIT_TIMEOUT_S, ServerError, TritonServer

DRAIN_S = 20.0  # --drain-timeout's default: under Kubernetes' 30 s grace period, with room for the unload
UNLOAD_S = 8.0  # after SIGTERM with every request ended, the longest tritonserver is waited for (it takes ~3 s)


def model_names(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


def artifact_of(repo: Path, name: str) -> Path:
    """The artifact directory a model of the repository serves (its ARTIFACT parameter)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from .interface import ARTIFACT

    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    location = Path(config.parameters[ARTIFACT].string_value)
    return location if location.is_absolute() else repo / name / location


def _excerpt(log: str, limit: int = 3000) -> str:
    """The end of tritonserver's log for an error message, its once-a-second "Timeout N: Found ..." countdown
    (printed while it waits for models to unload) cut to its last line, so that the lines before it show."""
    lines = log.splitlines()
    countdown = [i for i, line in enumerate(lines) if re.search(r'"Timeout \d+: Found', line)]
    dropped = set(countdown[:-1])
    kept = [line for i, line in enumerate(lines) if i not in dropped]
    return "\n".join(kept)[-limit:]


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", metavar="REPO_OR_ARTIFACT", type=click.Path(path_type=Path, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the endpoints bind to.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=0, help="Default: a free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=0, help="Default: a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, help="Default: a free port.")
@click.option("--openai", "openai_port", type=click.IntRange(0, 65535), default=None,
              help="Also serve /v1/completions and /v1/chat/completions on this port (0: a free one).")
@click.option("--model", "openai_model", default=None, help="The model the OpenAI endpoint serves (default: the first).")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds to wait for the server to be ready before stopping it with its reason.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="The server's log file (default: a temporary file, named on start).")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True, help="For an artifact: see llama-triton.")
@click.option("--queue", type=click.IntRange(min=0), default=64, show_default=True, help="For an artifact: see llama-triton.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="For an artifact: see llama-triton.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="For an artifact: see llama-triton.")
@click.option("--prefix-reuse/--no-prefix-reuse", default=True, show_default=True,
              help="For an artifact: see llama-triton.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=interface.DEFAULT_PREFILL_CHUNK,
              show_default=True, help="For an artifact: see llama-triton.")
@click.option("--drain-timeout", "drain_s", type=click.FloatRange(min=0), default=DRAIN_S, show_default=True,
              help="On Ctrl-C / SIGTERM, requests in flight get this many seconds to finish; then they are cancelled "
                   "(their clients get what was generated, finish_reason cancelled). New requests are refused.")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as one JSON line when ready.")
def main(source, host, http_port, grpc_port, metrics_port, openai_port, openai_model, timeout, log_path, slots,
         queue, threads, backend, prefix_reuse, prefill_chunk, drain_s, as_json):
    """Serve a Triton model repository (from llama-triton) or an artifact directory with tritonserver.

    Prints the endpoints when the server is ready; a model that cannot load ends with the server's reason
    within --timeout. Ctrl-C or SIGTERM refuses new requests, lets those in flight finish within --drain-timeout
    (a second Ctrl-C cancels them at once), stops the server and exits 0.

    \b
    Examples:
      llama-serve repo
      llama-serve out/tiny-static --slots 8 --openai 8000
      curl -N localhost:PORT/v2/models/llama/generate_stream -d '{"text_input": "Hello", "stream": true}'
    """
    workdir = Path(tempfile.mkdtemp(prefix="llama-serve-"))
    server = None
    try:
        if (source / "manifest.json").is_file():
            try:
                repo = write_repository(source, workdir / "repository", "llama", slots, queue, threads, backend,
                                        prefix_reuse=prefix_reuse, prefill_chunk=prefill_chunk)
                repo = repo.parent
            except RepositoryError as err:
                _fail(str(err), 2)
        else:
            repo = source
        names = model_names(repo)
        if not names:
            _fail(f"{source}: neither an artifact (manifest.json) nor a model repository (NAME/config.pbtxt); "
                  f"write one with llama-triton", 2)
        model = openai_model or names[0]
        if model not in names:
            _fail(f"--model {model}: the repository has {', '.join(names)}", 2)
        tokenizer = window = None
        if openai_port is not None:
            from llama_export.runtime.artifact import Artifact, ArtifactError
            from llama_export.runtime.tokenizer import LlamaTokenizer

            try:  # the OpenAI endpoint tokenizes with the served artifact's tokenizer
                artifact = Artifact.open(artifact_of(repo, model))
            except ArtifactError as err:
                _fail(f"--openai: {err}", 2)
            if artifact.tokenizer_path is None:
                _fail(f"--openai: {artifact.directory} has no tokenizer.model", 2)
            tokenizer, window = LlamaTokenizer(artifact.tokenizer_path), artifact.max_length
        own_log = log_path is None  # kept when something goes wrong, removed after a clean stop
        log_path = log_path or Path(tempfile.gettempdir()) / f"llama-serve-{os.getpid()}.log"
        stop_dir = workdir / "stop"
        stop_dir.mkdir()
        server = TritonServer(repo, log_path, host, http_port, grpc_port, metrics_port,
                              env={interface.STOP_DIR_ENV: str(stop_dir)})
        stopper = Stopper(server, stop_dir, drain_s)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopper.request())
        try:
            server.start()
        except (ServerError, OSError) as err:
            _fail(str(err))
        click.echo(f"tritonserver starting on {repo} (log: {server.log_path})", err=True)
        try:
            server.wait_ready(timeout)
        except ServerError as err:
            _fail(str(err))
        e = server.endpoints
        endpoints = {"http": e.http_url, "grpc": e.grpc_url, "metrics": e.metrics_url, "models": names,
                     "generate_stream": f"{e.http_url}/v2/models/{model}/generate_stream", "pid": server.process.pid}
        openai = None
        if openai_port is not None:
            from .openai_frontend import make_server

            openai_server, port = make_server(e.grpc_url, model, tokenizer, window, host, openai_port,
                                              graceful_s=drain_s + 10)
            openai = OpenAIThread(openai_server)
            if not openai.start():  # the finally below stops the server
                _fail(f"--openai {openai_port}: the OpenAI endpoint could not start on {host}:{port} (the port "
                      f"taken?); pick another port, or 0 for a free one")
            endpoints["openai"] = f"http://{host}:{port}/v1"
        if as_json:
            click.echo(json.dumps(endpoints), nl=True)
        else:
            for key in ("http", "generate_stream", "grpc", "metrics", "openai"):
                if key in endpoints:
                    click.echo(f"{key:16} {endpoints[key]}")
        sys.stdout.flush()
        code = serve_until_stopped(server, openai, stopper)
        if code == 0 and own_log:
            log_path.unlink(missing_ok=True)
        sys.exit(code)
    finally:
        if server is not None:  # whatever ended llama-serve, no server is left behind
            server.stop(grace=10)
        shutil.rmtree(workdir, ignore_errors=True)


class Stopper:
    """The stop, in order: the models drain (stop file), the OpenAI endpoint closes, tritonserver exits."""

    def __init__(self, server: TritonServer, directory: Path, drain_s: float):
        self.server, self.directory, self.drain_s = server, directory, drain_s
        self.asked = threading.Event()
        self.started = None

    def request(self) -> None:
        """A signal: the first starts the drain, a second ends it now (what is open is cancelled)."""
        first = not self.asked.is_set()
        self.started = self.started or time.monotonic()
        self._write_deadline(time.time() + (self.drain_s if first else 0.0))
        self.asked.set()

    def _write_deadline(self, deadline: float) -> None:
        tmp = self.directory / ".stop.tmp"
        tmp.write_text(repr(deadline))
        os.replace(tmp, self.directory / interface.STOP_FILE)

    def reports(self, what: str) -> dict[str, dict]:
        found = {}
        for path in self.directory.glob(f"*.{what}"):
            try:
                found[path.name[:-len(what) - 1]] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return found

    def wait_drained(self) -> dict[str, dict]:
        """Until every model that serves has reported that none of its requests is open (bounded)."""
        deadline = time.monotonic() + self.drain_s + 10
        while time.monotonic() < deadline and self.server.process.poll() is None:
            drained = self.reports("drained")
            if set(self.reports("serving")) <= set(drained):
                return drained
            time.sleep(0.05)
        return self.reports("drained")

    def stop_server(self, all_drained: bool) -> tuple[int | None, bool]:
        """SIGTERM and wait; the exit status and whether the server had to be killed. With every request ended,
        the server unloads in seconds, unless a gRPC client cancelled a stream after its final response (2.51 then
        never releases that request and waits out its exit timeout): it is killed after UNLOAD_S."""
        self.server.terminate()
        limit = UNLOAD_S if all_drained else EXIT_TIMEOUT_S + 10
        try:
            self.server.process.wait(limit)
            killed = False
        except subprocess.TimeoutExpired:
            killed = True
        return self.server.stop(grace=0), killed


class OpenAIThread:
    """The OpenAI endpoint's uvicorn server on a thread of its own, so that the signals stay with llama-serve's
    handler (uvicorn in the main thread takes them and would close only once its streams have ended)."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=self._run, name="openai-endpoint", daemon=True)

    def _run(self):
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            pass

    def start(self, timeout: float = 30) -> bool:
        """Whether it is listening (within `timeout`)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.server.started and self.thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Stop taking connections and wait (bounded) for the open ones to end."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_until_stopped(server: TritonServer, openai: OpenAIThread | None, stopper: Stopper) -> int:
    """Block until a signal or the server's own exit; then drain the models, stop the OpenAI endpoint (its
    streams have ended with their requests), then the server. 0 on a requested stop, else the server's status."""
    while not stopper.asked.is_set() and server.process.poll() is None:
        stopper.asked.wait(0.5)
    crashed = server.process.poll()
    if crashed is not None:
        if openai is not None:
            openai.stop(5)
        server.stop()
        click.echo(f"error: tritonserver exited ({crashed}):\n{_excerpt(server.log_text())}", err=True)
        return 1
    click.echo(f"stopping: new requests are refused; those in flight have {stopper.drain_s:g} s to finish "
               f"(--drain-timeout), then they are cancelled", err=True)
    drained = stopper.wait_drained()
    if openai is not None:  # its streams ended with their requests; idle connections are closed
        openai.stop(15)
    serving = stopper.reports("serving")
    for name in sorted(serving):
        report = drained.get(name)
        if report is None:
            click.echo(f"{name}: did not report its requests ended within {stopper.drain_s + 10:g} s", err=True)
            continue
        ended = ", ".join(f"{n} {reason}" for reason, n in sorted(report["ended"].items())) or "none"
        click.echo(f"{name}: {report['open_at_stop']} requests open at the stop; ended since: {ended} "
                   f"(drained in {report['seconds']:.1f} s)", err=True)
    all_drained = set(serving) <= set(drained)
    code, killed = stopper.stop_server(all_drained)
    for name, report in sorted(stopper.reports("finalized").items()):
        click.echo(f"{name}: finalized in {report['seconds']:.1f} s ({report['not_ended']} requests not ended)",
                   err=True)
    took = time.monotonic() - stopper.started
    if killed and all_drained:
        click.echo(f"warning: tritonserver still held a model {UNLOAD_S:g} s after every request had ended, so it was "
                   f"stopped with SIGKILL; most likely a gRPC client cancelled a stream after its final response, "
                   f"which tritonserver 2.51 never releases (docs/serving.md, 'Stopping'). Stopped in {took:.1f} s.",
                   err=True)
        return 0
    if killed or code not in (0, None):
        click.echo(f"error: tritonserver {'was killed' if killed else f'exited {code}'} while stopping:\n"
                   f"{_excerpt(server.log_text())}", err=True)
        return 1
    click.echo(f"stopped in {took:.1f} s", err=True)
    return 0


if __name__ == "__main__":
    main()
