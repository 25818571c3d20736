"""The Triton Python-backend model (decoupled): every request goes to the in-flight batcher.

`execute` checks each request's inputs, submits it to `runtime.inflight.InflightBatcher` and returns at once.
The batcher's thread hands each event to a queue; one sender thread of this model turns the events into
responses (`response_sender.send`, the last with TRITONSERVER_RESPONSE_COMPLETE_FINAL). Every SWEEP_S it asks
each request in flight whether it was cancelled (`request.is_cancelled()`, an IPC to the server, so not once per
token): a cancelled stream leaves the batch within about one decode step. It refreshes the gauges every GAUGES_S.
Keeping Triton's IPC off the batcher's thread keeps the batcher stepping while responses are sent.

Every request ends with exactly one final response, whatever ends it (its answer, a cancel, a client gone, a refusal,
bad input, a failing step): a request left without one is counted in flight by the server, which then never unloads
the model. Stopping (`interface.STOP_DIR_ENV`, set by llama-serve): when the stop file appears, new requests are
refused, the ones open get until its deadline to finish and are cancelled then, and the model writes its report
(`NAME.drained`, then `NAME.finalized`) into that directory.

`llama-triton` copies this file into REPO/NAME/1/model.py; the interface is `runtime.serving.interface`.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from llama_export.runtime.inflight import Busy, InflightBatcher, Request, RequestRejected
from llama_export.runtime.sampling import SamplingParams
from llama_export.runtime.tokenizer import LlamaTokenizer
from llama_export.runtime.serving import interface

SWEEP_S = 0.05  # how often every request in flight is checked for cancellation (within a decode step)
GAUGES_S = 0.5  # how often the gauges are refreshed (each set is an IPC to the server)
FINALIZE_S = 20.0  # the longest finalize waits for the batcher, then for the sender
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
STOP = object()


class BadRequest(ValueError):
    pass


def _values(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _scalar(request, name: str, convert, default):
    values = _values(request, name)
    if values is None:
        return default
    if values.size != 1:
        raise BadRequest(f"{name}: expected one value, got {values.size}")
    value = values[0]
    return value.decode("utf-8") if isinstance(value, bytes) else convert(value)


def _text(value, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as err:
        raise BadRequest(f"{name}: not valid UTF-8 ({err})") from None


class Live:
    """One request in flight: its Triton request and sender, the batcher's handle, what it asked for."""

    __slots__ = ("request", "sender", "handle", "stream", "prefix", "text", "tokens", "cancelled", "ended")

    def __init__(self, request, stream: bool, prefix: str):
        self.request, self.sender, self.handle = request, request.get_response_sender(), None
        self.stream, self.prefix, self.text, self.tokens = stream, prefix, [], []
        self.cancelled = False
        self.ended = False  # its final response was sent (or tried: the sender is closed either way)

    def check_cancelled(self) -> bool:
        """Whether the client cancelled (or went away); if so the batcher is told, once."""
        if not self.cancelled and self.handle is not None and self.request.is_cancelled():
            self.cancelled = True
            self.handle.cancel()  # the batcher drops the row within one step and sends the final event
        return self.cancelled


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(params[interface.ARTIFACT])
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]) / artifact
        threads = int(params.get(interface.THREADS, "0")) or None
        self.name = config["name"]
        self.batcher = InflightBatcher.open(artifact, slots=int(params.get(interface.SLOTS, "4")),
                                            max_queue=int(params.get(interface.QUEUE, "64")),
                                            backend=params.get(interface.BACKEND, "ort"), threads=threads,
                                            reuse_prefixes=params.get(interface.PREFIX_REUSE, "1") != "0",
                                            prefill_chunk=int(params.get(interface.PREFILL_CHUNK, "0")) or None)
        self.max_queue = int(params.get(interface.QUEUE, "64"))
        self.tokenizer = LlamaTokenizer(artifact / "tokenizer.model")
        self.window = self.batcher.max_length
        self._metrics()
        self.outbox: queue.Queue = queue.Queue()
        self.live: dict[int, Live] = {}  # id(Live) -> Live, touched only by the sender thread
        self.stop = Stop(os.environ.get(interface.STOP_DIR_ENV), self.name)
        self.sender = threading.Thread(target=self._send_loop, name="llama-responses", daemon=True)
        self.sender.start()

    # ---- metrics -----------------------------------------------------------------------------------------

    def _metrics(self):
        F, labels = pb_utils.MetricFamily, {"model": self.name}
        self.families = []  # a family must outlive its metrics

        def family(name: str, kind, description: str):
            self.families.append(F(name=interface.METRIC_PREFIX + name, kind=kind, description=description))
            return self.families[-1]

        def metric(name: str, kind, description: str, **extra):
            return family(name, kind, description).Metric(labels=labels, **extra)

        self.f_requests = family("requests_total", F.COUNTER,
                                 "Requests finished, by finish_reason (stop, length, cancelled, error, rejected)")
        self.m_requests = {}
        self.m_tokens = metric("generated_tokens_total", F.COUNTER, "Tokens generated")
        self.m_ttft = metric("time_to_first_token_seconds", F.HISTOGRAM, "From submission to the first new token",
                             buckets=TTFT_BUCKETS)
        self.m_itl = metric("inter_token_latency_seconds", F.HISTOGRAM,
                            "Between consecutive new tokens of one request", buckets=ITL_BUCKETS)
        self.m_running = metric("running_slots", F.GAUGE, "Requests in the batch now")
        self.m_queued = metric("queue_depth", F.GAUGE, "Requests waiting for a slot")
        self.m_open = metric("open_requests", F.GAUGE, "Requests taken and not yet ended with their final response")
        self.m_shared = metric("max_running_in_a_step", F.GAUGE, "Most requests that shared one batcher step so far")
        # counters that follow the batcher's running totals: stats key -> (metric, total reported so far)
        self.totals = {
            "steps": [metric("steps_total", F.COUNTER, "Engine steps (one batched forward each)"), 0],
            "prefix_queried_tokens": [metric("prefix_cache_queried_tokens_total", F.COUNTER,
                                             "Prompt tokens of requests that may reuse a kept slot's prefix"), 0],
            "prefix_hit_tokens": [metric("prefix_cache_hit_tokens_total", F.COUNTER,
                                         "Prompt tokens reused from a kept slot instead of prefilled"), 0]}
        self.gauges_at = 0.0
        self.closing = False

    def _count(self, reason: str):
        if reason not in self.m_requests:
            self.m_requests[reason] = self.f_requests.Metric(labels={"model": self.name, "finish_reason": reason})
        self.m_requests[reason].increment(1)

    def _gauges(self):
        stats = self.batcher.stats()
        self.m_running.set(stats["running"])
        self.m_queued.set(stats["queued"])
        self.m_open.set(len(self.live))
        self.m_shared.set(stats["max_running_in_a_step"])
        for key, total in self.totals.items():
            if stats[key] > total[1]:
                total[0].increment(stats[key] - total[1])
                total[1] = stats[key]

    # ---- requests ----------------------------------------------------------------------------------------

    def _parse(self, request) -> tuple[Request, bool, str]:
        """The batcher's Request, whether to stream, and the text put before the answer."""
        text, ids = _values(request, "text_input"), _values(request, "input_ids")
        if text is None and ids is None:
            raise BadRequest("text_input is missing: give the prompt as text_input (BYTES, one element)")
        if text is not None and ids is not None:
            raise BadRequest("give text_input or input_ids, not both")
        if text is not None:
            if text.size != 1:
                raise BadRequest(f"text_input: expected one prompt, got {text.size}")
            prompt = _text(text[0], "text_input")
            if not prompt:
                raise BadRequest("text_input is empty: give at least one character of prompt")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(i) for i in ids]
            vocab = self.tokenizer.vocab_size
            if not prompt_ids or not all(0 <= i < vocab for i in prompt_ids):
                raise BadRequest(f"input_ids: give at least one id, each in 0..{vocab - 1}")
            prompt = None
        n = len(prompt_ids)
        if n >= self.window:
            raise BadRequest(f"{'text_input' if text is not None else 'input_ids'}: the prompt has {n} tokens; the "
                             f"context window is {self.window} tokens, leaving no room for an answer — shorten it")
        max_tokens = _scalar(request, "max_tokens", int, interface.DEFAULT_MAX_TOKENS)
        if max_tokens < 1:
            raise BadRequest(f"max_tokens={max_tokens} must be at least 1")
        if n + max_tokens > self.window:
            raise BadRequest(f"max_tokens={max_tokens} is past the context window: the prompt has {n} tokens and "
                             f"the window is {self.window}, so max_tokens can be at most {self.window - n}")
        try:
            params = SamplingParams(temperature=_scalar(request, "temperature", float, 0.0),
                                    top_k=_scalar(request, "top_k", int, 0),
                                    top_p=_scalar(request, "top_p", float, 1.0),
                                    min_p=_scalar(request, "min_p", float, 0.0),
                                    repetition_penalty=_scalar(request, "repetition_penalty", float, 1.0),
                                    seed=_scalar(request, "seed", int, 0))
        except ValueError as err:
            raise BadRequest(str(err)) from None
        stops = _values(request, "stop")
        stops = tuple(_text(s, "stop") for s in stops) if stops is not None else ()
        if any(not s for s in stops):
            raise BadRequest("stop: a stop string is empty; give at least one character")
        stream = bool(_scalar(request, "stream", bool, False))
        exclude = bool(_scalar(request, "exclude_input_in_output", bool, False))
        prefix = "" if stream or exclude else (prompt if prompt is not None else self.tokenizer.decode(prompt_ids))
        ignore_eos = bool(_scalar(request, "ignore_eos", bool, False))
        cache_prompt = bool(_scalar(request, "cache_prompt", bool, True))
        salt = _scalar(request, "cache_salt", str, "")
        return (Request(prompt=prompt_ids, max_new_tokens=max_tokens, params=params, stop_strings=stops,
                        ignore_eos=ignore_eos, cache_prompt=cache_prompt, cache_salt=salt), stream, prefix)

    def execute(self, requests):
        for request in requests:
            live = None
            try:
                if self.stop.seen:
                    raise Stopping("the server is stopping: send the request to another server, or retry once "
                                   "this one is back")
                batch_request, stream, prefix = self._parse(request)
                live = Live(request, stream, prefix)
                self.outbox.put(("register", live, None))  # before any of its events: the queue keeps the order
                live.handle = self.batcher.submit(batch_request,
                                                  on_event=lambda e, live=live: self.outbox.put(("event", live, e)))
            except Exception as err:  # each request gets its own answer; the others in this call go on
                self._refuse(request, live, err)
        return None

    def _refuse(self, request, live: Live | None, err: Exception) -> None:
        """The one final response of a request refused before it ran (on the execute thread); never raises."""
        message = str(err)
        if isinstance(err, Busy):
            message = (f"the queue is full ({self.max_queue} requests waiting, --queue {self.max_queue}): "
                       f"retry later ({err})")
        elif not isinstance(err, (BadRequest, RequestRejected, Stopping)):
            message = f"the request failed: {err!r}"
            pb_utils.Logger.log_error(f"{self.name}: {message}")
        try:
            sender = live.sender if live is not None else request.get_response_sender()
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception as again:  # the sender is closed by the attempt: the request has ended all the same
            pb_utils.Logger.log_info(f"{self.name}: a refusal could not be delivered ({again!r}): {message}")
        if live is not None:
            live.ended = True
            self.outbox.put(("reject", live, None))
        else:
            self.outbox.put(("reject", None, None))

    # ---- responses (the sender thread) -------------------------------------------------------------------

    def _response(self, text: str, tokens, reason: str, cached: int | None = None):
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                   pb_utils.Tensor("token_ids", np.asarray(tokens, dtype=np.int32).reshape(-1)),
                   pb_utils.Tensor("finish_reason", np.array([reason.encode("utf-8")], dtype=np.object_))]
        if cached is not None:  # the last response
            tensors.append(pb_utils.Tensor("cached_tokens", np.array([cached], dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _send(self, live: Live, response, flags=0):
        if live.ended:  # a response after the final one would be refused by the server: a bug to see in the log
            pb_utils.Logger.log_error(f"{self.name}: a response after the request's final one was dropped")
            return
        live.ended = bool(flags & FINAL)
        try:
            live.sender.send(response, flags=flags)
        except Exception as err:  # a client gone: nothing to deliver to; the batcher is told by the cancellation check
            if live.handle is not None:
                live.handle.cancel()
            if flags & FINAL:  # the attempt closed the sender and the server ended the request regardless
                pb_utils.Logger.log_info(f"{self.name}: a final response could not be delivered ({err!r})")

    def _end(self, live: Live, make_response) -> None:
        """Send the request's one final response, built by `make_response()`; if building it fails, an error
        response ends the request instead."""
        self.live.pop(id(live), None)
        try:
            response = make_response()
        except Exception as err:
            pb_utils.Logger.log_error(f"{self.name}: building a final response failed: {err!r}")
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"the response failed: {err!r}"))
        self._send(live, response, FINAL)

    def _deliver(self, live: Live, event):
        if not event.final:
            if live.cancelled:  # seen by the sweep; no IPC per token (is_cancelled asks the server)
                return
            if live.stream:
                if event.text or event.tokens:
                    self._send(live, self._response(event.text, event.tokens, ""))
            else:
                live.text.append(event.text)
                live.tokens += event.tokens
            return
        done = event.result
        self.stop.ended(done.finish_reason)
        if done.finish_reason == "error":
            self._end(live, lambda: pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"generation failed: {done.error}")))
        elif live.stream:
            self._end(live, lambda: self._response(event.text, event.tokens, done.finish_reason, done.cached_tokens))
        else:
            live.text.append(event.text)
            live.tokens += event.tokens
            self._end(live, lambda: self._response(live.prefix + "".join(live.text), live.tokens, done.finish_reason,
                                                   done.cached_tokens))
        self._count(done.finish_reason)
        self.m_tokens.increment(len(done.tokens))
        if done.ttft_s is not None:
            self.m_ttft.observe(done.ttft_s)
        for gap in done.token_times_s:
            self.m_itl.observe(gap)

    def _sweep(self):
        if self.closing:  # finalize cancels every request itself
            return
        for live in list(self.live.values()):  # also while a backlog of events waits to be sent
            live.check_cancelled()
        # past the stop's deadline, what is still open is cancelled
        if self.stop.check(len(self.live), pending=not self.outbox.empty()):
            for live in self.live.values():
                if live.handle is not None:
                    live.handle.cancel()
        now = time.monotonic()
        if now - self.gauges_at >= GAUGES_S:
            self.gauges_at = now
            self._gauges()

    def _send_loop(self):
        swept = time.monotonic()
        while True:
            try:
                item = self.outbox.get(timeout=SWEEP_S)
            except queue.Empty:
                item = None
            if item is STOP:
                return
            if item is not None:
                kind, live, event = item
                if kind == "register":
                    self.live[id(live)] = live
                elif kind == "reject":
                    if live is not None:
                        self.live.pop(id(live), None)
                    self._count("rejected")
                else:
                    try:
                        self._deliver(live, event)
                    except Exception as err:  # keep serving the others
                        pb_utils.Logger.log_error(f"{self.name}: delivering a response failed: {err!r}")
            if time.monotonic() - swept >= SWEEP_S:
                swept = time.monotonic()
                try:
                    self._sweep()
                except Exception as err:
                    pb_utils.Logger.log_error(f"{self.name}: cancellation sweep failed: {err!r}")

    def finalize(self):
        """Every wait is bounded: a model that does not return from finalize keeps tritonserver from stopping."""
        started = time.monotonic()
        self.closing = True  # the sender stops asking the server anything but to send the final responses
        batcher_ended = self.batcher.close(timeout=FINALIZE_S)  # cancels the rest; their finals go to the sender
        self.outbox.put(STOP)
        self.sender.join(timeout=FINALIZE_S)
        left = len(self.live)
        self.live.clear()
        seconds = time.monotonic() - started
        state = lambda alive: "STILL RUNNING" if alive else "ended"  # noqa: E731
        pb_utils.Logger.log_info(f"{self.name}: finalized in {seconds:.1f} s (batcher {state(not batcher_ended)}, "
                                 f"sender {state(self.sender.is_alive())}, {left} requests not ended)")
        self.stop.report("finalized", {"seconds": round(seconds, 3), "batcher_ended": batcher_ended,
                                       "sender_ended": not self.sender.is_alive(), "not_ended": left})


class Stopping(RuntimeError):
    """A request that came after the stop began."""


class Stop:
    """The stop protocol with llama-serve (`interface.STOP_DIR_ENV`): the stop file's deadline, what was open when
    it appeared and how those requests ended, and the reports written back. Touched by the sender thread only
    (`seen` is also read by execute)."""

    def __init__(self, directory: str | None, name: str):
        self.directory = Path(directory) if directory else None
        self.name = name
        self.seen = False
        self.deadline = None  # time.monotonic() past which what is open is cancelled
        self.started = 0.0
        self.open_at_stop = 0
        self.reasons: dict[str, int] = {}
        self.drained = False
        if self.directory is not None:
            self.report("serving", {"pid": os.getpid()})

    def check(self, open_requests: int, pending: bool = False) -> bool:
        """Look for the stop file (an open per sweep); whether the deadline has passed with requests open.
        `pending`: events or registrations are still queued for the sender, so the count may be stale."""
        if self.directory is None:
            return False
        try:  # read again while stopping: a second signal to llama-serve moves the deadline to now
            deadline = float((self.directory / interface.STOP_FILE).read_text()) if not self.drained else None
        except (OSError, ValueError):  # not there yet (or being written)
            deadline = None
        if deadline is not None:
            now, first = time.monotonic(), not self.seen
            if first:
                self.seen, self.started, self.open_at_stop = True, now, open_requests
            self.deadline = now + max(0.0, deadline - time.time())
            if first:
                pb_utils.Logger.log_info(f"{self.name}: stopping: {open_requests} requests open; they have "
                                         f"{self.deadline - now:.1f} s to finish, then they are cancelled")
        if not self.seen:
            return False
        if open_requests == 0 and not pending and not self.drained:
            self.drained = True
            seconds = time.monotonic() - self.started
            pb_utils.Logger.log_info(f"{self.name}: drained in {seconds:.1f} s: {self.open_at_stop} requests were "
                                     f"open at the stop; ended since: {self.reasons or 'none'}")
            self.report("drained", {"open_at_stop": self.open_at_stop, "ended": self.reasons,
                                    "seconds": round(seconds, 3)})
        return open_requests > 0 and time.monotonic() >= self.deadline

    def ended(self, reason: str) -> None:
        if self.seen:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def report(self, what: str, fields: dict) -> None:
        """NAME.what (JSON) in the stop directory, written whole (renamed into place)."""
        if self.directory is None:
            return
        try:
            tmp = self.directory / f".{self.name}.{what}.tmp"
            tmp.write_text(json.dumps(fields))
            os.replace(tmp, self.directory / f"{self.name}.{what}")
        except OSError as err:
            pb_utils.Logger.log_error(f"{self.name}: could not write its {what} report: {err!r}")
