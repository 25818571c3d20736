"""`llama-triton`: a Triton model repository that serves an artifact directory, written in one command.

The repository holds one decoupled Python-backend model: `NAME/config.pbtxt`, generated as a
`tritonclient.grpc.model_config_pb2.ModelConfig` message and parsed back before it is written (no template
placeholders, no hand edits), and `NAME/1/model.py`, this package's model. The model's Python environment is
recorded in the config as `EXECUTION_ENV_PATH` (the venv this command runs in, which has the runtime), so the
repository runs from any directory; the server's Python stub ignores PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import click

from ..artifact import Artifact, ArtifactError

from . import interface

HERE = Path(__file__).resolve().parent
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RepositoryError(ValueError):
    pass


def check_artifact(directory: Path, backend: str) -> Artifact:
    """The artifact, if the in-flight batcher can serve it with `backend`; else a RepositoryError."""
    try:
        artifact = Artifact.open(directory)  # hashed once here; the verified-files record spares the model a second pass
    except ArtifactError as err:
        raise RepositoryError(str(err)) from None
    if artifact.flavour != "static":
        raise RepositoryError(
            f"{directory}: a {artifact.flavour} artifact (its KV cache grows with each sequence) cannot be batched in "
            f"flight; export a static-cache one: llama-export --model MODEL -o OUT --kv-cache static --max-seq-len N")
    if artifact.tokenizer_path is None:
        raise RepositoryError(f"{directory}: the artifact has no tokenizer.model; re-export with --tokenizer")
    if backend == "trt" and not (artifact.directory / "model.plan").is_file():
        raise RepositoryError(f"{directory}: no TensorRT engine (model.plan); build one with llama-build {directory}")
    return artifact


def execution_env() -> str | None:
    """The venv whose Python has the runtime (this one), for the model's EXECUTION_ENV_PATH; None outside a venv."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def model_config(name: str, artifact: str, slots: int, queue: int, threads: int | None, backend: str,
                 env: str | None, prefix_reuse: bool = True,
                 prefill_chunk: int = interface.DEFAULT_PREFILL_CHUNK):
    """The model's configuration as a ModelConfig message."""
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    for key, (dtype, _) in interface.INPUTS.items():
        config.input.add(name=key, data_type=mc.DataType.Value(dtype), dims=[-1], optional=True)
    for key, (dtype, _) in interface.OUTPUTS.items():
        config.output.add(name=key, data_type=mc.DataType.Value(dtype), dims=[-1])
    kind = mc.ModelInstanceGroup.KIND_GPU if backend == "trt" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=1, kind=kind)  # one batcher per model; its slots batch the requests
    parameters = {interface.ARTIFACT: artifact, interface.SLOTS: str(slots), interface.QUEUE: str(queue),
                  interface.BACKEND: backend, interface.THREADS: str(threads or 0),
                  interface.PREFIX_REUSE: "1" if prefix_reuse else "0", interface.PREFILL_CHUNK: str(prefill_chunk)}
    if env:
        parameters[interface.EXECUTION_ENV_PATH] = env
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    """config.pbtxt's text, parsed back through ModelConfig (an error names the line and field)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    text = text_format.MessageToString(config)
    parsed = text_format.Parse(text, mc.ModelConfig())
    if parsed != config:
        raise RepositoryError("config.pbtxt does not read back as the configuration written")
    return text


def write_repository(directory: Path, repo: Path, name: str = "llama", slots: int = 4, queue: int = 64,
                     threads: int | None = None, backend: str = "ort", copy: bool = False,
                     force: bool = False, prefix_reuse: bool = True,
                     prefill_chunk: int = interface.DEFAULT_PREFILL_CHUNK) -> Path:
    """Write REPO/NAME (config.pbtxt, 1/model.py, and with `copy` 1/artifact); the model directory."""
    if not NAME_RE.match(name):
        raise RepositoryError(f"--name {name!r}: use letters, digits, '_', '.', '-'")
    if slots < 1 or queue < 0:
        raise RepositoryError(f"--slots {slots} / --queue {queue}: give at least one slot and a queue of 0 or more")
    artifact = check_artifact(Path(directory), backend)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"-o {repo} is a file; give a directory for the model repository")
    target = repo / name
    if target.exists() and not force:
        raise RepositoryError(f"{target} already exists; remove it, pick another --name, or pass --force")
    location = "1/artifact" if copy else str(artifact.directory.resolve())
    if prefill_chunk < 0:
        raise RepositoryError(f"--prefill-chunk {prefill_chunk}: give 0 (whole prompts) or a number of tokens")
    text = config_text(model_config(name, location, slots, queue, threads, backend, execution_env(), prefix_reuse,
                                    prefill_chunk))
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repo))  # renamed into place when complete
    try:
        (staging / "1").mkdir()
        shutil.copyfile(HERE / "model.py", staging / "1" / "model.py")
        if copy:
            shutil.copytree(artifact.directory, staging / "1" / "artifact")
        (staging / "config.pbtxt").write_text(text)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-o", "--output", "repo", type=click.Path(path_type=Path), required=True,
              help="The model repository (created if missing); the model goes into REPO/NAME.")
@click.option("--name", default="llama", show_default=True, help="The model's name in Triton's URLs.")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together in each step (the in-flight batcher's batch).")
@click.option("--queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a slot at most; past that a request is refused as busy.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: the runtime's).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (instance KIND_CPU). trt: the artifact's TensorRT engine (KIND_GPU).")
@click.option("--copy", is_flag=True, help="Copy the artifact into the repository (else it is referred to by path).")
@click.option("--prefix-reuse/--no-prefix-reuse", default=True, show_default=True,
              help="A free slot keeps the sequence that last ran in it, and a prompt that starts with it prefills "
                   "only the rest (off: every prompt is prefilled whole; see docs/inflight.md on isolation).")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=interface.DEFAULT_PREFILL_CHUNK,
              show_default=True,
              help="A longer prompt is prefilled this many tokens per step, between decode steps of the running "
                   "requests, so that it does not stall them for its whole prefill (0: whole prompts).")
@click.option("--force", is_flag=True, help="Replace REPO/NAME if it exists.")
def main(directory, repo, name, slots, queue, threads, backend, prefix_reuse, prefill_chunk, copy, force):
    """Write a Triton model repository serving a static-cache artifact DIRECTORY.

    \b
    Examples:
      llama-triton out/tiny-static -o repo
      llama-triton out/7b-static -o repo --name llama7b --slots 8 --threads 16
      llama-serve repo
    """
    try:
        target = write_repository(directory, repo, name, slots, queue, threads, backend, copy, force, prefix_reuse,
                                  prefill_chunk)
    except RepositoryError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"wrote {target} (serve it with: llama-serve {repo})", err=True)
    if execution_env() is None:
        click.echo("note: not run from a venv, so no EXECUTION_ENV_PATH was recorded: the server's Python must "
                   "import the runtime by itself", err=True)


if __name__ == "__main__":
    main()
