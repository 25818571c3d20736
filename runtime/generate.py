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
from .tokenizer import LlamaTokenizer


class GenerationError(ValueError):
    pass


@dataclass
class Row:
    """One prompt's state during generation."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


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
        longest = max(len(p) for p in prompts)
        if longest >= max_length:
            raise GenerationError(f"a prompt has {longest} tokens; the context window is {max_length}, leaving no "
                                  f"room to generate — shorten the prompt")
        if any(not s for s in stop_strings):
            raise GenerationError("a stop string is empty; give at least one character of text to stop at")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if longest + max_new_tokens > max_length:
            raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                  f"context window of {max_length}; lower max_new_tokens to "
                                  f"{max_length - longest} or less")
        self.backend, self.tokenizer, self.params = backend, tokenizer, params
        self.max_new_tokens, self.stop_strings = max_new_tokens, tuple(stop_strings)
        self.stops = {tokenizer.eos_id, *stop_token_ids}
        self.seqs = [Row(p) for p in prompts]
        self.results: list[Result] = []

    def _advance(self, seq: Row, stream, token: int) -> str:
        """Record one sampled token for one row; the text it adds."""
        if token in self.stops:
            seq.finish_reason = "stop"
            delta = stream.flush()
        else:
            seq.tokens.append(token)
            delta = stream.push(token)
            hit = next((s for s in self.stop_strings if s in seq.text + delta), None)
            if hit:
                delta, seq.finish_reason = (seq.text + delta)[len(seq.text):(seq.text + delta).index(hit)], "stop"
        seq.text += delta
        return delta

    def __iter__(self) -> Iterator[list[str]]:
        seqs, rng = self.seqs, np.random.default_rng(self.params.seed)
        streams = [self.tokenizer.stream() for _ in seqs]
        for seq, stream in zip(seqs, streams):  # the prompt first, so the first new piece keeps its space
            for token in seq.prompt:
                stream.push(token)
        logits, past, mask, last_pos = prefill(self.backend, [s.prompt for s in seqs])
        active = list(range(len(seqs)))  # the sequence behind each row of the backend's batch
        for step in range(self.max_new_tokens):
            rows = [seqs[i] for i in active]
            seen = [s.prompt + s.tokens for s in rows] if self.params.repetition_penalty != 1.0 else None
            tokens = sample(logits, self.params, rng, seen)
            deltas = [""] * len(seqs)
            for i, token in zip(active, tokens):
                if not seqs[i].finish_reason:
                    deltas[i] = self._advance(seqs[i], streams[i], int(token))
            if step + 1 == self.max_new_tokens:
                for i in active:
                    if not seqs[i].finish_reason:
                        rest = streams[i].flush()
                        seqs[i].text, deltas[i], seqs[i].finish_reason = seqs[i].text + rest, deltas[i] + rest, "length"
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
