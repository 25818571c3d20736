"""`llama-generate`: text from an artifact directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .artifact import Artifact, ArtifactError
from .backends import BACKENDS, open_backend
from .generation import Generation, GenerationError
from .hugepages import relaunch_with_huge_pages
from .sampling import SamplingParams
from .tokenizer import LlamaTokenizer, TokenizerError


ENVIRONMENT = """\b
Environment:
  LLAMA_EXPORT_HUGEPAGES=0    keep 4 KiB pages (default: restart once on
                              2 MiB pages where glibc and the kernel can)
  LLAMA_EXPORT_VERIFY=always  hash every artifact file at every start
                              (default: only files changed since their
                              sha256 last matched the manifest)
  LLAMA_EXPORT_CACHE=DIR      where that record lives
                              (default: ~/.cache/llama-export)
"""


def to_stderr(message: str) -> None:
    """The commands' progress lines (e.g. `Artifact.open`'s), kept off stdout, which carries the text or JSON."""
    click.echo(message, err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Text to continue; give several --prompt to run them as one batch (on a static-cache artifact "
                   "through the in-flight batcher: each prompt in a slot of its own, no padding).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", "stop_strings", multiple=True, help="Stop a sequence when its text contains this string.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: ONNX Runtime (CUDA when onnxruntime-gpu has it, else CPU). trt: the TensorRT engine "
                   "llama-build wrote into the artifact (a GPU and TensorRT 11). torch: the reference PyTorch "
                   "model on the artifact's weights (float artifacts; parity and baseline).")
@click.option("--cuda-graph", is_flag=True,
              help="trt, static-cache artifacts: replay each decode step as a CUDA graph.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads (default: the runtime's choice).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt: tokens, text, finish_reason.")
def main(directory, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
         stop_strings, backend, cuda_graph, threads, as_json):
    """Generate text with an artifact directory written by llama-export.

    \b
    Examples:
      llama-generate out/tiny-float32 --prompt "A list comprehension"
      llama-generate out/tiny-float32 --prompt "Lists" --prompt "The tutorial" --json
      llama-generate out/tiny-float32 --prompt "Tuples" --temperature 0.8 --top-p 0.9 --seed 1
    """
    relaunch_with_huge_pages()  # once, before any weight is loaded
    try:
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        artifact = Artifact.open(directory, log=to_stderr)
        if artifact.tokenizer_path is None:
            raise ArtifactError(f"{directory}: the artifact has no tokenizer.model; re-export with --tokenizer")
        tokenizer = LlamaTokenizer(artifact.tokenizer_path)
        ids = [tokenizer.encode_within(p, artifact.max_length) if p else [] for p in prompts]
        runner = open_backend(artifact, backend, threads, cuda_graph)
        run = Generation(runner, tokenizer, ids, runner.max_length, max_new_tokens, params, stop_strings=stop_strings)
        if as_json or len(prompts) > 1:
            for _ in run:
                pass
            for prompt, result in zip(prompts, run.results):
                if as_json:
                    click.echo(json.dumps({"prompt": prompt, "tokens": result.tokens, "text": result.text,
                                           "finish_reason": result.finish_reason}))
                else:
                    click.echo(f"--- {prompt}{result.text}")
        else:
            click.echo(prompts[0], nl=False)
            for deltas in run:
                click.echo(deltas[0], nl=False)
            click.echo()
    except (ArtifactError, GenerationError, TokenizerError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
