"""Generation as small functions (prefill, decode_one_token, sample) over any backend.

Prompts of different lengths form one left-padded batch; each row finishes on its own (EOS, a stop
token id, a stop string, max_new_tokens or the context window), and a finished row leaves the batch
(`backend.keep_rows`), so it costs no more compute. Several prompts on a static-cache backend go through the
in-flight batcher instead (`runtime.inflight`: each prompt in a slot of its own, at its own position, no padding),
the one code path for batching a static cache. Each row samples with a generator of its own seeded from
`params.seed`, so a prompt's tokens do not depend on the other prompts of its batch.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .backends import serves_slots
from .inflight import InflightBatcher, Request
from .sampling import SamplingParams, sample
from .sequence import GenerationError, Row, check_request
from .tokenizer import LlamaTokenizer


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
                 stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), ignore_eos: bool = False):
        prompts = [list(p) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise GenerationError("a prompt is empty; give at least one token of text")
        check_request(max(len(p) for p in prompts), max_new_tokens, max_length, stop_strings)
        self.backend, self.tokenizer, self.params = backend, tokenizer, params
        self.max_new_tokens, self.stop_strings = max_new_tokens, tuple(stop_strings)
        self.stops = {*stop_token_ids} if ignore_eos else {tokenizer.eos_id, *stop_token_ids}
        self.ignore_eos = ignore_eos
        self.seqs = [Row(p) for p in prompts]
        self.results: list[Result] = []

    def __iter__(self) -> Iterator[list[str]]:
        if len(self.seqs) > 1 and serves_slots(self.backend):
            yield from self._inflight()
            return
        seqs, params = self.seqs, self.params
        rngs = [np.random.default_rng(params.seed) for _ in seqs]
        for seq in seqs:
            seq.start(self.tokenizer)
        logits, past, mask, last_pos = prefill(self.backend, [s.prompt for s in seqs])
        active = list(range(len(seqs)))  # the sequence behind each row of the backend's batch
        for step in range(self.max_new_tokens):
            rows = [seqs[i] for i in active]
            seen = [s.prompt + s.tokens for s in rows] if params.repetition_penalty != 1.0 else None
            if params.temperature == 0:
                tokens = sample(logits, params, None, seen)
            else:
                tokens = np.array([sample(logits[r:r + 1], params, rngs[i], seen and seen[r:r + 1])[0]
                                   for r, i in enumerate(active)])
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

    def _inflight(self) -> Iterator[list[str]]:
        """The prompts as requests of an in-flight batcher with a slot each, all admitted in its first step; each
        event yields its row's new text."""
        count = len(self.seqs)
        events: queue.SimpleQueue = queue.SimpleQueue()
        batcher = InflightBatcher(self.backend, self.tokenizer, slots=count, max_queue=count,
                                  prefill_tokens_per_step=sum(len(s.prompt) for s in self.seqs))
        try:
            requests = [Request(s.prompt, self.max_new_tokens, self.params, self.stop_strings,
                                tuple(self.stops - {self.tokenizer.eos_id}), self.ignore_eos) for s in self.seqs]
            batcher.submit_many(requests, [lambda event, row=row: events.put((row, event)) for row in range(count)])
            results: list[Result | None] = [None] * count
            while None in results:
                row, event = events.get()
                deltas = [""] * count
                deltas[row] = event.text
                if event.final:
                    done = event.result
                    if done.finish_reason == "error":
                        raise RuntimeError(f"generation of prompt {row + 1} failed: {done.error}")
                    results[row] = Result(done.tokens, done.text, done.finish_reason)
                    self.seqs[row].tokens, self.seqs[row].text = done.tokens, done.text
                    self.seqs[row].finish_reason = done.finish_reason
                yield deltas
            self.results = results
        finally:
            batcher.close()


def generate(backend, tokenizer, prompts, max_length, max_new_tokens, params=SamplingParams(),
             stop_token_ids=(), stop_strings=(), ignore_eos=False) -> list[Result]:
    run = Generation(backend, tokenizer, prompts, max_length, max_new_tokens, params, stop_token_ids, stop_strings,
                     ignore_eos)
    for _ in run:
        pass
    return run.results
