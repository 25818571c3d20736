"""In-flight batching: requests join and leave the running batch at every step.

`InflightBatcher` keeps a fixed pool of cache slots over a static-cache artifact (`--kv-cache static`): one
sequence per row of the `[slots, kv_heads, max_sequence_length, head_dim]` buffers, each at its own length (the
backend's `SlotCache` keeps every row's length and mask). Its own thread runs the loop; each step:

1. cancelled rows leave;
2. admission: waiting requests take free slots in arrival order and are prefilled **alone**, one after the
   other (batch 1, written straight into the slot's rows of the shared buffers), while this step's prefilled prompt
   tokens stay within `prefill_tokens_per_step` (default 256; the first one always goes: a prompt is never split).
   A free slot keeps the sequence that last ran in it: a request takes the free slot whose kept tokens share the
   longest prefix with its prompt, and only the rest of the prompt is prefilled, at that position (prefix reuse;
   `Request.cache_prompt=False` or `reuse_prefixes=False` prefill the whole prompt). A whole prompt prefilled alone
   is the very computation of the request's solo run, so its first token is, bit for bit, the solo run's; a suffix
   prefilled after a kept prefix sums in another order (tested: the same greedy tokens, logits within the fp32
   parity threshold). The first token is sent as soon as its prefill ends. The running rows wait at most
   `max(prefill_tokens_per_step, one prompt)` tokens of prefill per step (a prompt is at most one window);
3. one decode step over all running rows, each at its own position (per-row `write_indices`, positions and
   mask rows, which the static graph takes per row), on the buffers in place (IOBinding, no copy).

Running rows always fill rows `0..n-1` of the cache, so a decode step runs exactly the running rows: a row that
finishes (or is cancelled) frees its slot at once, and the top row moves down into it (one copy of that row's
filled positions, once per finished request, never per step); with prefix reuse the two rows are swapped, so the
finished sequence stays in the cache as the top free row. A sequence whose step failed is never kept. With
`prefill_chunk`, a longer prompt is prefilled that many tokens per step in the row just above the running rows,
which decode between its parts. Each request samples with its own numpy Generator seeded from its `params.seed`,
so a request's tokens do not depend on its neighbours: greedy ones equal its solo `llama-generate` run, and so do
seeded sampled ones.

Bad input is refused at `submit` (`RequestRejected`, with the numbers); a full waiting queue makes `submit` raise
`Busy` at once. An exception inside a step fails the requests that step concerns (the one prefilled, or the rows
of the decode) with the error, and the loop goes on serving. See docs/inflight.md.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .artifact import Artifact, ArtifactError
from .backends import open_backend, serves_slots
from .sequence import GenerationError, Row, check_request
from .sampling import SamplingParams, sample
from .tokenizer import LlamaTokenizer

log = logging.getLogger(__name__)
PREFILL_TOKENS_PER_STEP = 256  # default admission budget of a step (docs/inflight.md: why)


class Busy(RuntimeError):
    """The waiting queue is full: retry later."""


class RequestRejected(GenerationError):
    """A request that cannot run (its message names the field and the numbers)."""


@dataclass(frozen=True)
class Request:
    prompt: str | Sequence[int]  # text is encoded with BOS, as llama-generate does
    max_new_tokens: int = 16
    params: SamplingParams = SamplingParams()
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # run to max_new_tokens past end-of-sequence (load benchmarks)
    cache_prompt: bool = True  # False: prefill the whole prompt (the solo run's exact computation), reuse nothing
    cache_salt: str = ""  # prefixes are shared only between requests of the same salt (vLLM's name)


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None
    prompt_tokens: int
    queued_s: float  # submit → admitted into a slot
    ttft_s: float | None  # submit → first token
    token_times_s: list[float]  # the gaps between successive tokens after the first
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a slot's earlier sequence


@dataclass(frozen=True)
class Event:
    text: str  # new text since the previous event, never half a character
    tokens: list[int]  # new token ids since the previous event
    final: bool = False
    result: Completion | None = None


@dataclass(eq=False)
class _Sequence:
    """A request inside the batcher."""
    handle: "Handle"
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    stops: set[int]
    stop_strings: tuple[str, ...]
    on_event: Callable[[Event], None] | None
    cache_prompt: bool = True
    cache_salt: str = ""
    cached: int = 0  # prompt tokens taken from a kept slot
    filled: int = 0  # prompt tokens whose keys and values are written (chunked prefill)
    row: Row = None
    rng: np.random.Generator = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)


class Handle:
    """One submitted request: iterate for its events (blocking, the final one included), or wait for `result`."""

    def __init__(self, batcher: "InflightBatcher", request_id: int):
        self.id = request_id
        self._batcher = batcher
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if event.final:
                return

    def cancel(self) -> None:
        """Idempotent; the request leaves the batch (or the queue) within one step, its final event "cancelled"."""
        if not self._done.is_set():
            self.cancelled = True
            self._batcher._wake()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        return self._completion

    def done(self) -> bool:
        return self._done.is_set()


class InflightBatcher:
    """A pool of `slots` sequences over a static-cache backend, served by a thread of its own (module docstring).
    Thread-safe: submit and cancel from any thread."""

    def __init__(self, backend, tokenizer: LlamaTokenizer, slots: int = 4, max_queue: int = 64,
                 prefill_tokens_per_step: int | None = None, reuse_prefixes: bool = True,
                 prefill_chunk: int | None = None):
        if not serves_slots(backend):
            raise ValueError(f"the in-flight batcher needs a static-cache backend; {type(backend).__name__} runs a "
                             f"growing cache: re-export with `llama-export ... --kv-cache static --max-seq-len N`")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots={slots} must be >= 1 and max_queue={max_queue} >= 0")
        self.backend, self.tokenizer = backend, tokenizer
        self.slots, self.max_queue = slots, max_queue
        self.max_length = backend.max_length
        self.prefill_tokens_per_step = prefill_tokens_per_step or PREFILL_TOKENS_PER_STEP
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1 (None: whole prompts)")
        self.prefill_chunk = prefill_chunk
        self._filling: _Sequence | None = None  # a long prompt prefilled a chunk per step, in row len(_rows)
        self.vocab_size = tokenizer.vocab_size
        self._cache = backend.slot_cache(slots)
        self._rows: list[_Sequence] = []  # row i of the cache holds _rows[i]; rows 0..n-1, no gaps
        # free rows n..slots-1 keep the sequence that last ran there: its token ids, and when it was last used
        self._reuse = reuse_prefixes and hasattr(backend, "swap_rows")
        self._kept: list[list[int]] = [[] for _ in range(slots)]
        self._used = [0.0] * slots
        self._salt = [""] * slots  # the kept sequence's cache_salt
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._stats = {"steps": 0, "prefills": 0, "tokens_generated": 0, "requests_done": 0, "errors": 0,
                       "max_running_in_a_step": 0, "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}
        self._rows_per_step: collections.Counter[int] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="inflight-batcher", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, artifact_dir: str | Path, slots: int = 4, max_queue: int = 64, backend: str = "ort",
             threads: int | None = None, prefill_tokens_per_step: int | None = None,
             log: Callable[[str], None] | None = None, reuse_prefixes: bool = True,
             prefill_chunk: int | None = None) -> "InflightBatcher":
        """The artifact's backend and tokenizer under a batcher (`log` hears of large files being hashed)."""
        artifact = Artifact.open(artifact_dir, log=log)
        if artifact.flavour != "static":
            raise ValueError(f"{artifact_dir}: a portable (growing-cache) artifact; the in-flight batcher serves "
                             f"static-cache ones: re-export with `llama-export ... --kv-cache static --max-seq-len N`")
        if artifact.tokenizer_path is None:
            raise ArtifactError(f"{artifact_dir}: the artifact has no tokenizer.model; re-export with --tokenizer")
        return cls(open_backend(artifact, backend, threads), LlamaTokenizer(artifact.tokenizer_path), slots,
                   max_queue, prefill_tokens_per_step, reuse_prefixes, prefill_chunk)

    # ---- the callers' side -----------------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt) if prompt else []
        try:
            ids = [int(i) for i in prompt]
        except (TypeError, ValueError):
            raise RequestRejected(f"prompt must be text or a list of token ids, not {type(prompt).__name__}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request; its handle. Raises `RequestRejected` for a request that cannot run, `Busy` when the
        waiting queue is full."""
        return self.submit_many([request], [on_event])[0]

    def submit_many(self, requests: Sequence[Request],
                    on_events: Sequence[Callable[[Event], None] | None] | None = None) -> list[Handle]:
        """Queue several requests at once, all or none (each checked first), in one step's admission if they fit."""
        checked = [self._check(request) for request in requests]
        on_events = on_events or [None] * len(checked)
        with self._cond:
            if self._closing:
                raise RuntimeError("the in-flight batcher is closed")
            if len(self._waiting) + len(checked) > self.max_queue:
                raise Busy(f"busy: the waiting queue is full ({len(self._waiting)} of {self.max_queue} requests "
                           f"waiting for {self.slots} slots); retry later")
            handles = []
            for (ids, max_new_tokens, params, stops, stop_strings, cache_prompt, salt), on_event in zip(checked,
                                                                                                     on_events):
                handles.append(Handle(self, next(self._ids)))
                self._waiting.append(_Sequence(handles[-1], ids, max_new_tokens, params, stops, stop_strings,
                                               on_event, cache_prompt, salt))
            self._cond.notify()
        return handles

    def _check(self, request: Request) -> tuple:
        """A request's prompt ids, max_new_tokens, sampling parameters, stop ids and stop strings, checked."""
        ids = self._prompt_ids(request.prompt)
        if not ids:
            raise RequestRejected("a prompt is empty; give at least one token of text")
        params = request.params
        if isinstance(params, dict):
            try:
                params = SamplingParams(**params)
            except (TypeError, ValueError) as err:
                raise RequestRejected(f"sampling parameters: {err}") from None
        elif not isinstance(params, SamplingParams):
            raise RequestRejected(f"params must be SamplingParams, not {type(params).__name__}")
        if not isinstance(request.max_new_tokens, (int, np.integer)) or isinstance(request.max_new_tokens, bool):
            raise RequestRejected(f"max_new_tokens={request.max_new_tokens!r} must be an integer")
        check_request(len(ids), int(request.max_new_tokens), self.max_length, request.stop_strings,
                      error=RequestRejected)
        stop_ids = [int(i) for i in request.stop_token_ids]
        bad = [i for i in stop_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestRejected(f"stop token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        stops = {*stop_ids} if request.ignore_eos else {self.tokenizer.eos_id, *stop_ids}
        if not isinstance(request.cache_salt, str):
            raise RequestRejected(f"cache_salt must be a string, not {type(request.cache_salt).__name__}")
        return (ids, int(request.max_new_tokens), params, stops, tuple(request.stop_strings),
                bool(request.cache_prompt), request.cache_salt)

    def stats(self) -> dict:
        with self._cond:
            steps = self._stats["steps"]
            rows = sum(n * count for n, count in self._rows_per_step.items())
            return {"slots": self.slots, "running": len(self._rows), "queued": len(self._waiting), **self._stats,
                    "rows_per_step": dict(sorted(self._rows_per_step.items())),
                    "mean_occupancy": round(rows / (steps * self.slots), 4) if steps else 0.0}

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every queued and running request (their final events are sent) and join the thread (within
        `timeout` seconds, if given); returns whether the thread has ended."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> "InflightBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the batcher's thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._rows or self._filling):
                    self._cond.wait()
                if self._closing:
                    break
                cancelled = [s for s in self._waiting if s.handle.cancelled]
                for seq in cancelled:
                    self._waiting.remove(seq)
                admitted, budget = [], self.prefill_tokens_per_step
                staying = sum(not seq.handle.cancelled for seq in self._rows)  # cancelled rows leave this step
                # while a long prompt is prefilled chunk by chunk it holds the next row: nobody else is admitted
                while self._filling is None and self._waiting and staying + len(admitted) < self.slots and \
                        (not admitted or len(self._waiting[0].prompt) <= budget):
                    admitted.append(self._waiting.popleft())
                    budget -= len(admitted[-1].prompt)
                    if self.prefill_chunk and len(admitted[-1].prompt) > self.prefill_chunk:
                        break  # it may take the next row for several steps: the last admitted of this step
            for seq in cancelled:
                self._finish(seq, "cancelled")
            try:
                self._step(admitted)
            except Exception as err:  # a fault outside the guarded calls: fail what the step held, keep serving
                log.exception("in-flight batcher step failed")
                filling, self._filling = self._filling, None
                for seq in [*admitted, *self._rows, *([filling] if filling else [])]:
                    if not seq.handle.done():
                        self._finish(seq, "error", err)
                for row in range(min(len(self._rows) + 1, self.slots)):
                    self.backend.clear_row(self._cache, row)
                    self._kept[row] = []
                self._rows = []
        with self._cond:
            left, self._waiting = [*self._rows, *self._waiting], collections.deque()
        if self._filling is not None:
            left.append(self._filling)
            self.backend.clear_row(self._cache, len(self._rows))
            self._filling = None
        for seq in left:
            self._finish(seq, "cancelled")
        self._rows = []

    def _step(self, admitted: list[_Sequence]) -> None:
        self._leave([row for row, seq in enumerate(self._rows) if seq.handle.cancelled], "cancelled")
        if self._filling is not None:
            self._prefill(self._filling)
        for seq in admitted:
            seq.admitted = time.perf_counter()
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
                continue
            row = len(self._rows)
            seq.row, seq.rng = Row(seq.prompt), np.random.default_rng(seq.params.seed)
            seq.row.start(self.tokenizer)
            try:
                seq.cached = seq.filled = self._take_row(row, seq)
            except Exception as err:
                log.warning("prefill of request %d failed: %s", seq.handle.id, err)
                self.backend.clear_row(self._cache, row)
                self._finish(seq, "error", err)
                continue
            self._prefill(seq)
        if not self._rows:
            return
        rows = list(self._rows)
        ids = np.array([[seq.row.tokens[-1]] for seq in rows], np.int64)
        try:
            logits = self.backend.step_rows(self._cache, 0, len(rows), ids)
        except Exception as err:
            log.warning("decode step over %d rows failed: %s", len(rows), err)
            for seq in rows:
                self._finish(seq, "error", err)
            self._leave(list(range(len(rows))))
            return
        with self._cond:
            self._stats["steps"] += 1
            self._rows_per_step[len(rows)] += 1
            self._stats["max_running_in_a_step"] = max(self._stats["max_running_in_a_step"], len(rows))
        greedy = logits.argmax(-1)
        finished = []
        for row, seq in enumerate(rows):
            try:
                token = int(greedy[row]) if self._is_greedy(seq) else self._sample(seq, logits[row:row + 1])
            except Exception as err:
                self._finish(seq, "error", err)
                finished.append(row)
                continue
            if self._advance(seq, token):
                finished.append(row)
        self._leave(finished)

    def _prefill(self, seq: _Sequence) -> None:
        """Prefill the next part of `seq`'s prompt in row len(_rows): all of the rest, or with `prefill_chunk` at most
        that many tokens (the sequence is then `_filling` until its last chunk). After the last part its first
        token is sampled and it joins the running rows. A cancelled or failed prefill leaves its row empty: a
        half-written prompt is never kept."""
        row = len(self._rows)
        if seq.handle.cancelled:
            self._filling = None
            self.backend.clear_row(self._cache, row)
            self._finish(seq, "cancelled")
            return
        end = len(seq.prompt) if not self.prefill_chunk else min(len(seq.prompt), seq.filled + self.prefill_chunk)
        try:
            part = np.array([seq.prompt[seq.filled:end]], np.int64)
            logits = self.backend.step_rows(self._cache, row, row + 1, part)
            seq.filled = end
            token = self._sample(seq, logits[0:1]) if end == len(seq.prompt) else None
        except Exception as err:
            log.warning("prefill of request %d failed: %s", seq.handle.id, err)
            self._filling = None
            self.backend.clear_row(self._cache, row)
            self._finish(seq, "error", err)
            return
        if token is None:
            self._filling = seq
            return
        self._filling = None
        self._stats["prefills"] += 1
        self._rows.append(seq)
        if self._advance(seq, token):
            self._leave([row])

    @staticmethod
    def _is_greedy(seq: _Sequence) -> bool:
        return seq.params.temperature == 0 and seq.params.repetition_penalty == 1.0

    @staticmethod
    def _sample(seq: _Sequence, logits: np.ndarray) -> int:
        seen = [seq.prompt + seq.row.tokens] if seq.params.repetition_penalty != 1.0 else None
        return int(sample(logits, seq.params, seq.rng, seen)[0])

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token and send its event; whether the request finished."""
        now = time.perf_counter()
        before = len(seq.row.tokens)
        delta = seq.row.advance(token, seq.stops, seq.stop_strings, seq.max_new_tokens)
        new = seq.row.tokens[before:]
        if new:
            if seq.first is None:
                seq.first = now
            else:
                seq.gaps.append(now - seq.last)
            seq.last = now
            self._stats["tokens_generated"] += 1
        if seq.row.finish_reason:
            self._finish(seq, seq.row.finish_reason, text=delta, tokens=new)
            return True
        self._send(seq, Event(delta, new))
        return False

    def _leave(self, rows: list[int], reason: str | None = None) -> None:
        """These rows leave the batch (finished already, or for `reason`); the top rows move down into the gaps. With
        prefix reuse, a sequence that did not fail stays in its row's cache, which becomes the top free row."""
        for row in sorted(rows, reverse=True):
            seq, top = self._rows[row], len(self._rows) - 1
            if reason and not seq.handle.done():
                self._finish(seq, reason)
            failed = seq.handle._completion is not None and seq.handle._completion.finish_reason == "error"
            if self._reuse and not failed and self._keep(row, top, seq):
                pass
            elif row != top:
                self.backend.move_row(self._cache, top, row)
                self._rows[row] = self._rows[top]
                self._kept[top] = []
            else:
                self.backend.clear_row(self._cache, row)
                self._kept[row] = []
            self._rows.pop()
            if self._filling is not None:  # the prompt being prefilled moves down with the running rows
                self._lower(top + 1, top)

    def _lower(self, source: int, target: int) -> None:
        """Row `source`'s sequence to row `target` (free): swapped where rows are kept, else moved."""
        if self._reuse:
            try:
                self.backend.swap_rows(self._cache, source, target)
                self._swap_kept(source, target)
                self._kept[target] = []
                return
            except NotImplementedError:
                self._reuse = False
        self.backend.move_row(self._cache, source, target)
        self._kept[source] = self._kept[target] = []

    def _keep(self, row: int, top: int, seq: _Sequence) -> bool:
        """Move a finished sequence to the top row (swapping with the running one there) and keep it; False where
        the backend cannot swap rows of this cache (prefix reuse is then off)."""
        try:
            self.backend.swap_rows(self._cache, row, top)
        except NotImplementedError:
            self._reuse = False
            return False
        if row != top:
            self._rows[row] = self._rows[top]
        length = int(self._cache.lengths[top])
        self._kept[top] = (seq.prompt + seq.row.tokens)[:length]
        self._used[top], self._salt[top] = time.monotonic(), seq.cache_salt
        return True

    def _swap_kept(self, a: int, b: int) -> None:
        """What the batcher knows of rows a and b's kept sequences follows a swap of the rows."""
        self._kept[a], self._kept[b] = self._kept[b], self._kept[a]
        self._used[a], self._used[b] = self._used[b], self._used[a]
        self._salt[a], self._salt[b] = self._salt[b], self._salt[a]

    def _take_row(self, row: int, seq: _Sequence) -> int:
        """Make free row `row` ready for `seq`, reusing the longest prefix of its prompt found in the cache (at least
        one prompt token is left to prefill, for its logits): a kept sequence is swapped in and cut to it; a running
        sequence's prompt is copied into the least recently used free row; else that row is emptied. The number of
        prompt tokens reused."""
        free = range(row, self.slots)
        common = {r: 0 for r in free}
        running, from_running = None, 0
        if self._reuse and seq.cache_prompt:
            limit = len(seq.prompt) - 1
            for r in free:  # only sequences of the same cache_salt share
                if self._salt[r] == seq.cache_salt:
                    common[r] = _common_prefix(self._kept[r], seq.prompt, limit)
            for r, other in enumerate(self._rows):  # their prompts are written whole and never change
                shared = _common_prefix(other.prompt, seq.prompt, limit) if other.cache_salt == seq.cache_salt else 0
                if shared > from_running:
                    running, from_running = r, shared
            with self._cond:
                self._stats["prefix_queried_tokens"] += len(seq.prompt)
        source = max(free, key=lambda r: (common[r], -self._used[r]))
        copy = from_running > common[source]
        if copy:
            source = min(free, key=lambda r: self._used[r])
        if source != row:
            self.backend.swap_rows(self._cache, source, row)
            self._swap_kept(source, row)
        reused = from_running if copy else common[source]
        if copy:
            try:
                self.backend.copy_prefix(self._cache, running, row, reused)
            except NotImplementedError:
                self.backend.clear_row(self._cache, row)
                reused = 0
        elif reused:
            self.backend.truncate_row(self._cache, row, reused)
        else:
            self.backend.clear_row(self._cache, row)
        if reused:
            with self._cond:
                self._stats["prefix_hit_tokens"] += reused
        self._kept[row] = []
        return reused

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None, text: str = "",
                tokens: list[int] | None = None) -> None:
        row = seq.row
        completion = Completion(
            tokens=list(row.tokens) if row else [], text=row.text if row else "", finish_reason=reason,
            error=f"{type(error).__name__}: {error}" if error is not None else None, prompt_tokens=len(seq.prompt),
            queued_s=(seq.admitted if seq.admitted is not None else time.perf_counter()) - seq.submitted,
            ttft_s=seq.first - seq.submitted if seq.first is not None else None, token_times_s=list(seq.gaps),
            cached_tokens=seq.cached)
        with self._cond:
            self._stats["requests_done"] += 1
            self._stats["errors"] += reason == "error"
        seq.handle._completion = completion
        self._send(seq, Event(text, tokens or [], True, completion))
        seq.handle._done.set()

    @staticmethod
    def _send(seq: _Sequence, event: Event) -> None:
        seq.handle._events.put(event)
        if seq.on_event is not None:
            try:
                seq.on_event(event)
            except Exception:
                log.exception("on_event of request %d raised; ignored", seq.handle.id)


def _common_prefix(kept: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `kept` and `prompt` share, at most `limit`."""
    n = min(len(kept), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(kept[:n]) != np.asarray(prompt[:n]))
    return int(differ[0]) if differ.size else n
