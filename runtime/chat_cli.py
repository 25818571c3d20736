"""`llama-chat`: an interactive Llama-2-chat session over an artifact directory."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .artifact import Artifact, ArtifactError
from .backends import BACKENDS, open_backend, serves_slots
from .chat import ChatFormatError, chat_prompt_ids
from .cli import ENVIRONMENT, to_stderr
from .generation import Generation
from .hugepages import relaunch_with_huge_pages
from .inflight import InflightBatcher, Request
from .sampling import SamplingParams
from .tokenizer import LlamaTokenizer, TokenizerError


def fit_history(tokenizer: LlamaTokenizer, system: str | None, turns: list[dict], window: int,
                reserve: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user/assistant pairs until the prompt leaves `reserve` tokens of the window."""
    while True:
        dialog = ([{"role": "system", "content": system}] if system else []) + turns
        ids = chat_prompt_ids(tokenizer, dialog)
        if len(ids) + reserve <= window or len(turns) <= 1:
            return turns, ids
        turns = turns[2:]


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt, folded into the first turn between <<SYS>> tags.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest answer.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: ONNX Runtime. trt: the artifact's TensorRT engine (llama-build). torch: the reference "
                   "PyTorch model on the artifact's weights.")
@click.option("--show-stats", is_flag=True,
              help="After each answer, print to stderr its prompt tokens, how many were reused from the turns "
                   "before, and its new tokens.")
def main(directory, system, max_new_tokens, temperature, top_p, seed, backend, show_stats):
    """Chat with an artifact in the Llama-2-chat format, streaming each answer.

    The conversation is kept while it fits in the context window; the oldest turns are dropped
    when it does not. On a static-cache artifact the keys and values of the conversation so far are
    kept between turns, and each turn prefills only what is new. Type /reset to start over, /quit (or
    end the input) to leave. Without a terminal (input from a pipe or file) the exit status is 2 if a
    message was refused.
    """
    relaunch_with_huge_pages()  # once, before any weight is loaded
    try:
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        artifact = Artifact.open(directory, log=to_stderr)
        if artifact.tokenizer_path is None:
            raise ArtifactError(f"{directory}: the artifact has no tokenizer.model; re-export with --tokenizer")
        tokenizer, backend = LlamaTokenizer(artifact.tokenizer_path), open_backend(artifact, backend)
    except (ArtifactError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    window, turns = backend.max_length, []
    # one slot that keeps the conversation's keys and values: each turn prefills only what the last did not hold
    batcher = InflightBatcher(backend, tokenizer, slots=1, max_queue=1) if serves_slots(backend) else None
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the tokenizer, which names them
        sys.stdin.reconfigure(errors="surrogateescape")
    refused = False  # without a terminal, a refused message makes the exit status 2
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            sys.exit(2 if refused and not interactive else 0)
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            turns = []
            click.echo("(conversation cleared)")
            continue
        if not message.strip():
            continue
        try:
            tokenizer.encode_within(message, window, "this message")  # quick refusals: too long, not UTF-8
            kept, ids = fit_history(tokenizer, system, turns + [{"role": "user", "content": message}], window,
                                    reserve=1)
        except (ChatFormatError, TokenizerError) as err:
            click.echo(f"error: {err}", err=True)
            refused = True
            continue
        if len(kept) < len(turns) + 1:
            click.echo(f"(context window of {window} tokens full: dropped the oldest "
                       f"{(len(turns) + 1 - len(kept)) // 2} exchange(s))", err=True)
        if len(ids) >= window:
            click.echo(f"error: this message alone needs {len(ids)} tokens; the context window is {window}. "
                       f"Send a shorter message or /reset.", err=True)
            refused = True
            continue
        answer = say(backend, batcher, tokenizer, ids, window, min(max_new_tokens, window - len(ids)), params)
        if show_stats:
            click.echo(f"({len(ids)} prompt tokens, {getattr(answer, 'cached_tokens', 0)} reused; "
                       f"{len(answer.tokens)} new tokens)", err=True)
        if answer.finish_reason == "length" and len(ids) + len(answer.tokens) >= window:
            click.echo("(the answer stopped at the end of the context window)", err=True)
        turns = kept + [{"role": "assistant", "content": answer.text}]


def say(backend, batcher, tokenizer, ids: list[int], window: int, max_new_tokens: int, params):
    """Stream one answer to stdout; its result (tokens, text, finish_reason; from the batcher, cached_tokens too)."""
    if batcher is None:
        run = Generation(backend, tokenizer, [ids], window, max_new_tokens, params)
        for deltas in run:
            click.echo(deltas[0], nl=False)
        click.echo()
        return run.results[0]
    handle = batcher.submit(Request(ids, max_new_tokens, params))
    for event in handle:
        click.echo(event.text, nl=False)
    click.echo()
    done = handle.result()
    if done.finish_reason == "error":
        raise RuntimeError(f"generation failed: {done.error}")
    return done


if __name__ == "__main__":
    main()
