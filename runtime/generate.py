"""Generation as small functions (prefill, decode_one_token, sample) over any backend.

Prompts of different lengths form one left-padded batch; each row finishes on its own (EOS, a stop
token id, a stop string, max_new_tokens or the context window), and a finished row leaves the batch
(`backend.keep_rows`), so it costs no more compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .sampling import SamplingParams, sample
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


@dataclass(frozen=True)
class Result:
    tokens: list[int]
    text: str
    finish_reason: str


def left_pad(prompts: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros((len(prompts), longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, positions


def prefill(backend, prompts):
    ids, mask, pos = left_pad(prompts)
    logits, past = backend.forward(ids, mask, pos, backend.empty_cache(len(prompts)), 1)
    return logits[:, -1], past, mask, pos[:, -1:]


def decode_one_token(backend, tokens, past, mask, last_pos):
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    pos = last_pos + 1
    logits, past = backend.forward(tokens.reshape(-1, 1).astype(np.int64), mask, pos, past, 1)
    return logits[:, -1], past, mask, pos


class Generation:
    """Iterate to stream: each step yields the new text of every row ("" for rows with none); after
    the loop, `results` holds each row's tokens, text and finish reason."""

    def __init__(self, backend, tokenizer: LlamaTokenizer, prompts: Sequence[list[int]], max_length: int,
                 max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        prompts = [list(p) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise GenerationError("a prompt is empty; give at least one token of text")
        check_request(max(len(p) for p in prompts), max_new_tokens, max_length, stop_strings)
        self.backend, self.tokenizer, self.params = backend, tokenizer, params
        self.max_new_tokens, self.stop_strings = max_new_tokens, tuple(stop_strings)
        self.stops = {tokenizer.eos_id, *stop_token_ids}
        self.seqs = [Row(p) for p in prompts]
        self.results: list[Result] = []

    def __iter__(self) -> Iterator[list[str]]:
        seqs, rng = self.seqs, np.random.default_rng(self.params.seed)
        for seq in seqs:
            seq.start(self.tokenizer)
        logits, past, mask, last_pos = prefill(self.backend, [s.prompt for s in seqs])
        active = list(range(len(seqs)))  # the sequence behind each row of the backend's batch
        for step in range(self.max_new_tokens):
            rows = [seqs[i] for i in active]
            seen = [s.prompt + s.tokens for s in rows] if self.params.repetition_penalty != 1.0 else None
            tokens = sample(logits, self.params, rng, seen)
            deltas = [""] * len(seqs)
            for i, token in zip(active, tokens):
                if not seqs[i].finish_reason:
                    deltas[i] = seqs[i].advance(int(token), self.stops, self.stop_strings, self.max_new_tokens)
            yield deltas
            if all(s.finish_reason for s in seqs):
                break
            running = [row for row, i in enumerate(active) if not seqs[i].finish_reason]
            if len(running) < len(active):  # finished rows leave the batch
                past = self.backend.keep_rows(past, running)
                tokens, mask, last_pos = tokens[running], mask[running], last_pos[running]
                active = [active[row] for row in running]
            logits, past, mask, last_pos = decode_one_token(self.backend, tokens, past, mask, last_pos)
        self.results = [Result(s.tokens, s.text, s.finish_reason or "length") for s in seqs]


def generate(backend, tokenizer, prompts, max_length, max_new_tokens, params=SamplingParams(),
             stop_token_ids=(), stop_strings=()) -> list[Result]:
    run = Generation(backend, tokenizer, prompts, max_length, max_new_tokens, params, stop_token_ids, stop_strings)
    for _ in run:
        pass
    return run.results
