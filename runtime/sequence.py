"""One request's sequence as it generates: its tokens and text (decoded incrementally, never half a character), why it
finished, and the checks a request must pass before it runs. Shared by `generate.Generation` and the in-flight
batcher (`inflight.InflightBatcher`), so that both stop, cut and stream text the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .tokenizer import LlamaTokenizer, StreamDecoder


class GenerationError(ValueError):
    pass


def check_request(prompt_tokens: int, max_new_tokens: int, max_length: int, stop_strings: Sequence[str],
                  error: type[ValueError] = GenerationError) -> None:
    """Refuse, with the numbers, a request that cannot run: a prompt that fills the window, max_new_tokens < 1 or
    past the window, an empty stop string."""
    if prompt_tokens >= max_length:
        raise error(f"a prompt has {prompt_tokens} tokens; the context window is {max_length}, leaving no room to "
                    f"generate — shorten the prompt")
    if any(not s for s in stop_strings):
        raise error("a stop string is empty; give at least one character of text to stop at")
    if max_new_tokens < 1:
        raise error(f"max_new_tokens={max_new_tokens} must be at least 1")
    if prompt_tokens + max_new_tokens > max_length:
        raise error(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                    f"of {max_length}; lower max_new_tokens to {max_length - prompt_tokens} or less")


@dataclass
class Row:
    """One prompt's state during generation: its tokens and text so far, decoded incrementally (never half a
    character), and why it finished. Shared by `Generation` and the in-flight batcher (`runtime.inflight`)."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stream: StreamDecoder | None = field(default=None, repr=False)

    def start(self, tokenizer: LlamaTokenizer) -> None:
        """The prompt goes through the stream decoder first, so that the first new piece keeps its space."""
        self.stream = tokenizer.stream()
        for token in self.prompt:
            self.stream.push(token)

    def advance(self, token: int, stops: set[int], stop_strings: Sequence[str], max_new_tokens: int) -> str:
        """Record one sampled token; the text it adds. A stop id ends the row without being kept; a stop string
        ends it with the text cut before the string; the `max_new_tokens`-th token ends it for "length"."""
        if token in stops:
            self.finish_reason = "stop"
            delta = self.stream.flush()
        else:
            self.tokens.append(token)
            delta = self.stream.push(token)
            hit = next((s for s in stop_strings if s in self.text + delta), None)
            if hit:
                delta, self.finish_reason = (self.text + delta)[len(self.text):(self.text + delta).index(hit)], "stop"
            elif len(self.tokens) == max_new_tokens:
                delta, self.finish_reason = delta + self.stream.flush(), "length"
        self.text += delta
        return delta
