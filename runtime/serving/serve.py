"""`llama-serve`: tritonserver on a model repository (or an artifact, through a repository written for it), ready
or a clear error within a timeout, the endpoints printed, stopped cleanly on Ctrl-C / SIGTERM; with `--openai
PORT` an OpenAI-compatible endpoint in this process, forwarding to the server over gRPC streaming."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from .repository import RepositoryError, write_repository
from .server import ServerError, TritonServer


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
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as one JSON line when ready.")
def main(source, host, http_port, grpc_port, metrics_port, openai_port, openai_model, timeout, log_path, slots,
         queue, threads, backend, as_json):
    """Serve a Triton model repository (from llama-triton) or an artifact directory with tritonserver.

    Prints the endpoints when the server is ready; a model that cannot load ends with the server's reason
    within --timeout. Ctrl-C or SIGTERM lets in-flight streams finish, stops the server and exits 0.

    \b
    Examples:
      llama-serve repo
      llama-serve out/tiny-static --slots 8 --openai 8000
      curl -N localhost:PORT/v2/models/llama/generate_stream -d '{"text_input": "Hello", "stream": true}'
    """
    workdir = Path(tempfile.mkdtemp(prefix="llama-serve-"))
    try:
        if (source / "manifest.json").is_file():
            try:
                repo = write_repository(source, workdir / "repository", "llama", slots, queue, threads, backend)
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
        server = TritonServer(repo, log_path, host, http_port, grpc_port, metrics_port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
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
        openai_server = None
        if openai_port is not None:
            from .openai_frontend import make_server

            openai_server, port = make_server(e.grpc_url, model, tokenizer, window, host, openai_port)
            endpoints["openai"] = f"http://{host}:{port}/v1"
        if as_json:
            click.echo(json.dumps(endpoints), nl=True)
        else:
            for key in ("http", "generate_stream", "grpc", "metrics", "openai"):
                if key in endpoints:
                    click.echo(f"{key:16} {endpoints[key]}")
        sys.stdout.flush()
        code = serve_until_stopped(server, openai_server, stop)
        if code == 0 and own_log:
            log_path.unlink(missing_ok=True)
        sys.exit(code)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def serve_until_stopped(server: TritonServer, openai_server, stop: threading.Event) -> int:
    """Block until a signal or the server's own exit; stop the OpenAI endpoint first (its streams drain), then
    the server (its streams drain). 0 on a requested stop, else the server's exit status."""
    if openai_server is not None:
        def watch():
            while not stop.is_set() and server.process.poll() is None:
                stop.wait(0.5)
            openai_server.should_exit = True
        threading.Thread(target=watch, daemon=True).start()
        openai_server.run()  # returns once should_exit is set and its connections are done
        stop.set()
    while not stop.is_set() and server.process.poll() is None:
        stop.wait(0.5)
    crashed = server.process.poll()
    if crashed is not None:
        server.stop()
        click.echo(f"error: tritonserver exited ({crashed}):\n{_excerpt(server.log_text())}", err=True)
        return 1
    click.echo("stopping: letting in-flight requests finish", err=True)
    code = server.stop()
    if code not in (0, None):
        click.echo(f"error: tritonserver exited {code} while stopping:\n{_excerpt(server.log_text())}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    main()
