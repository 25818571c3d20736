"""`llama-reference`: generate text with the PyTorch reference model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .cli_options import dtype_option, model_options
from .errors import ExportError
from .presets import check_vocabulary, find_tokenizer, resolve_checkpoint
from llama_export.runtime.chat import ChatFormatError, chat_prompt_ids
from llama_export.runtime.tokenizer import LlamaTokenizer, TokenizerError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@dtype_option("float32")
@click.option("--prompt", default="The Python tutorial", show_default=True, help="Text to continue.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the Llama-2-chat [INST] format.")
@click.option("--system", default=None, help="System prompt for --chat.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.model to use (default: the checkpoint's).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy.")
def main(model_name, checkpoint, random_weights, seed, dtype, prompt, chat, system, tokenizer_path,
         max_new_tokens, temperature):
    """Generate text with the reference PyTorch Llama (the baseline every export is checked against).

    \b
    Examples:
      llama-reference --prompt "Lists are"
      llama-reference --model 7b-chat --chat --system "Be brief." --prompt "What is RoPE?"
      llama-reference --checkpoint ./Llama-2-7b-hf --fp16 --max-new-tokens 32
    """
    try:
        ckpt = resolve_checkpoint(model_name, checkpoint, random_weights, seed)
        tokenizer = find_tokenizer(model_name, checkpoint, tokenizer_path)
        if tokenizer is None:
            raise ExportError(f"no tokenizer.model found for {model_name!r}; pass --tokenizer PATH "
                              f"(a Llama sentencepiece model)")
        check_vocabulary(tokenizer, ckpt.config)
        tok = LlamaTokenizer(tokenizer)
        window = ckpt.config.max_position_embeddings
        if not prompt.strip() and not chat:
            raise ExportError("--prompt is empty; give at least one word of text to continue")
        tok.encode_within(prompt, window, "--prompt")  # quick refusals: too long, not UTF-8
        if chat:
            dialog = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = chat_prompt_ids(tok, dialog)
        else:
            ids = tok.encode(prompt)
        if len(ids) + max_new_tokens > window:
            raise ExportError(f"--prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                              f"{window} positions; lower --max-new-tokens to {max(window - len(ids), 0)} or less"
                              + ("" if len(ids) < window else " and shorten the prompt"))
        from .reference_generate import generate  # torch, once the input is known good
        from .loading import load_model

        t0 = time.perf_counter()
        model = load_model(ckpt, dtype)
        click.echo(f"loaded {ckpt.source}: {ckpt.config.num_parameters() / 1e6:.1f} M parameters, {dtype}, "
                   f"{time.perf_counter() - t0:.1f} s", err=True)
        stream = tok.stream()
        shown = "".join(stream.push(i) for i in ids)  # the prompt, so the first new piece keeps its space
        if not chat:
            click.echo(shown, nl=False)
        t0, n = time.perf_counter(), 0
        for token in generate(model, ids, max_new_tokens, eos_id=tok.eos_id, temperature=temperature, seed=seed):
            click.echo(stream.push(token), nl=False)
            n += 1
        click.echo(stream.flush())
        click.echo(f"{n} tokens in {time.perf_counter() - t0:.2f} s", err=True)
    except (ExportError, ChatFormatError, TokenizerError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
