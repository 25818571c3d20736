"""The Triton Python-backend model (decoupled): every request goes to the in-flight batcher.

`execute` checks each request's inputs, submits it to `runtime.inflight.InflightBatcher` and returns at once.
The batcher's thread hands each event to a queue; one sender thread of this model turns the events into
responses (`response_sender.send`, the last with TRITONSERVER_RESPONSE_COMPLETE_FINAL). Every SWEEP_S it asks
each request in flight whether it was cancelled (`request.is_cancelled()`, an IPC to the server, so not once per
token): a cancelled stream leaves the batch within about one decode step. It refreshes the gauges every GAUGES_S.
Keeping Triton's IPC off the batcher's thread keeps the batcher stepping while responses are sent.

`llama-triton` copies this file into REPO/NAME/1/model.py; the interface is `runtime.serving.interface`.
"""

from __future__ import annotations

import json
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

    __slots__ = ("request", "sender", "handle", "stream", "prefix", "text", "tokens", "cancelled")

    def __init__(self, request, stream: bool, prefix: str):
        self.request, self.sender, self.handle = request, request.get_response_sender(), None
        self.stream, self.prefix, self.text, self.tokens = stream, prefix, [], []
        self.cancelled = False

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
                                            backend=params.get(interface.BACKEND, "ort"), threads=threads)
        self.max_queue = int(params.get(interface.QUEUE, "64"))
        self.tokenizer = LlamaTokenizer(artifact / "tokenizer.model")
        self.window = self.batcher.max_length
        self._metrics()
        self.outbox: queue.Queue = queue.Queue()
        self.live: dict[int, Live] = {}  # id(Live) -> Live, touched only by the sender thread
        self.sender = threading.Thread(target=self._send_loop, name="llama-responses", daemon=True)
        self.sender.start()

    # ---- metrics -----------------------------------------------------------------------------------------

    def _metrics(self):
        F, p, labels = pb_utils.MetricFamily, interface.METRIC_PREFIX, {"model": self.name}
        self.f_requests = F(name=p + "requests_total", kind=F.COUNTER,
                            description="Requests finished, by finish_reason (stop, length, cancelled, error, rejected)")
        self.m_requests = {}
        self.f_tokens = F(name=p + "generated_tokens_total", description="Tokens generated", kind=F.COUNTER)
        self.m_tokens = self.f_tokens.Metric(labels=labels)
        self.f_steps = F(name=p + "steps_total", description="Engine steps (one batched forward each)",
                         kind=F.COUNTER)
        self.m_steps = self.f_steps.Metric(labels=labels)
        self.f_ttft = F(name=p + "time_to_first_token_seconds", kind=F.HISTOGRAM,
                        description="From submission to the first new token")
        self.m_ttft = self.f_ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.f_itl = F(name=p + "inter_token_latency_seconds", kind=F.HISTOGRAM,
                       description="Between consecutive new tokens of one request")
        self.m_itl = self.f_itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.f_running = F(name=p + "running_slots", description="Requests in the batch now", kind=F.GAUGE)
        self.m_running = self.f_running.Metric(labels=labels)
        self.f_queued = F(name=p + "queue_depth", description="Requests waiting for a slot", kind=F.GAUGE)
        self.m_queued = self.f_queued.Metric(labels=labels)
        self.f_shared = F(name=p + "max_running_in_a_step", kind=F.GAUGE,
                          description="Most requests that shared one batcher step so far")
        self.m_shared = self.f_shared.Metric(labels=labels)
        self.steps_reported = 0
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
        self.m_shared.set(stats["max_running_in_a_step"])
        if stats["steps"] > self.steps_reported:
            self.m_steps.increment(stats["steps"] - self.steps_reported)
            self.steps_reported = stats["steps"]

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
        return (Request(prompt=prompt_ids, max_new_tokens=max_tokens, params=params, stop_strings=stops,
                        ignore_eos=ignore_eos), stream, prefix)

    def execute(self, requests):
        for request in requests:
            live = None
            try:
                batch_request, stream, prefix = self._parse(request)
                live = Live(request, stream, prefix)
                self.outbox.put(("register", live, None))  # before any of its events: the queue keeps the order
                live.handle = self.batcher.submit(batch_request,
                                                  on_event=lambda e, live=live: self.outbox.put(("event", live, e)))
            except Exception as err:  # each request gets its own answer; the others in this call go on
                message = str(err)
                if isinstance(err, Busy):
                    message = (f"the queue is full ({self.max_queue} requests waiting, --queue {self.max_queue}): "
                               f"retry later ({err})")
                elif not isinstance(err, (BadRequest, RequestRejected)):
                    message = f"the request failed: {err!r}"
                    pb_utils.Logger.log_error(f"{self.name}: {message}")
                sender = live.sender if live is not None else request.get_response_sender()
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
                self.outbox.put(("reject", live, None))
        return None

    # ---- responses (the sender thread) -------------------------------------------------------------------

    def _response(self, text: str, tokens, reason: str):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.asarray(tokens, dtype=np.int32).reshape(-1)),
            pb_utils.Tensor("finish_reason", np.array([reason.encode("utf-8")], dtype=np.object_))])

    def _send(self, live: Live, response, flags=0):
        try:
            live.sender.send(response, flags=flags)
        except Exception as err:  # a client gone: nothing to deliver to; the batcher is told by the cancellation check
            if live.handle is not None:
                live.handle.cancel()
            if flags & FINAL:  # the request must still end, or the server counts it in flight and cannot stop
                try:
                    live.sender.send(flags=FINAL)
                except Exception as again:
                    pb_utils.Logger.log_error(f"{self.name}: a request could not be ended ({err!r}; {again!r})")

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
        self.live.pop(id(live), None)
        done = event.result
        self._count(done.finish_reason)
        self.m_tokens.increment(len(done.tokens))
        if done.ttft_s is not None:
            self.m_ttft.observe(done.ttft_s)
        for gap in done.token_times_s:
            self.m_itl.observe(gap)
        if done.finish_reason == "error":
            self._send(live, pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {done.error}")),
                       FINAL)
        elif live.stream:
            self._send(live, self._response(event.text, event.tokens, done.finish_reason), FINAL)
        else:
            live.text.append(event.text)
            live.tokens += event.tokens
            self._send(live, self._response(live.prefix + "".join(live.text), live.tokens, done.finish_reason), FINAL)

    def _sweep(self):
        if self.closing:  # finalize cancels every request itself
            return
        for live in list(self.live.values()):  # also while a backlog of events waits to be sent
            live.check_cancelled()
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
        state = lambda alive: "STILL RUNNING" if alive else "ended"  # noqa: E731
        pb_utils.Logger.log_info(f"{self.name}: finalized in {time.monotonic() - started:.1f} s (batcher "
                                 f"{state(not batcher_ended)}, sender {state(self.sender.is_alive())}, {left} "
                                 f"requests not ended)")
