"""Stopping llama-serve after real traffic, on a real tritonserver: after each kind of load SIGTERM gives exit 0
within seconds with the model finalized, no process and no /dev/shm segment left, five times in a row; requests in
flight finish, or are cancelled at --drain-timeout; every request path ends with exactly one final response."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llama_export.runtime.serving.client import infer_inputs, is_final
from llama_export.runtime.serving.repository import write_repository
from serving_helpers import (WINDOW, Reference, Served, artifact, pid_alive,  # noqa: F401 (fixtures)
                             reference, sse_events)

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

PROMPTS = ["A list comprehension", "The tutorial explains how", "Tuples are", "Once upon a time"]
STOP_LIMIT_S = 10  # SIGTERM with nothing in flight to exit
REPEAT = 5
OPEN = 'llama_open_requests{model="%s"}'


@pytest.fixture(scope="module")
def repo(artifact, tmp_path_factory):
    """`llama` (4 slots) and `tight` (one slot, a queue of one: for refusals as busy)."""
    repo = tmp_path_factory.mktemp("stop-repo")
    write_repository(artifact, repo, "llama", slots=4, queue=32, threads=1)
    write_repository(artifact, repo, "tight", slots=1, queue=1, threads=1)
    return repo


def serve(repo: Path, log: Path, *args: str) -> Served:
    return Served(repo, "--openai", "0", "--model", "llama", "--log", str(log), *args)


def stub_pids(server_pid: int) -> list[int]:
    """The server's children (the Python stubs, one per model)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == server_pid:
            pids.append(int(stat.parent.name))
    return pids


def wait_idle(server: Served, models=("llama", "tight"), timeout: float = 20) -> None:
    """Until every model says no request is open (the gauge is refreshed every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if all(metrics.get(OPEN % m, -1) == 0 for m in models):
            return
        assert time.monotonic() < deadline, {m: metrics.get(OPEN % m) for m in models}
        time.sleep(0.2)


def stop_cleanly(server: Served, log: Path) -> float:
    """SIGTERM with nothing in flight: exit 0 within STOP_LIMIT_S, every model finalized (not killed), no process
    and no /dev/shm segment left; the seconds it took."""
    stubs = stub_pids(server.server_pid)
    assert len(stubs) == 2, stubs
    started = time.monotonic()
    code = server.stop(timeout=60)
    took = time.monotonic() - started
    assert code == 0, server.stderr
    assert took < STOP_LIMIT_S, (took, server.stderr)
    assert "warning" not in server.stderr and "0 requests open at the stop" in server.stderr, server.stderr
    for name in ("llama", "tight"):
        assert re.search(rf"^{name}: finalized in [\d.]+ s \(0 requests not ended\)$", server.stderr, re.M), \
            server.stderr
    assert not any(pid_alive(pid) for pid in [server.server_pid, *stubs])
    assert not server.leftover_shm()
    text = log.read_text()
    assert not re.search(r"^E\d{4} .*model\.py", text, re.M), "the model logged an error"
    return took


# ---- the loads -------------------------------------------------------------------------------------------------


def openai_streaming(server: Served, reference: Reference):
    """16 streaming completions, 8 clients at a time, with the usage chunk."""
    def one(i):
        with httpx.stream("POST", server.endpoints["openai"] + "/completions", timeout=60,
                          json={"prompt": PROMPTS[i % 4], "max_tokens": 24 + i, "temperature": 0, "stream": True,
                                "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 24 + i
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts[0] == reference(PROMPTS[0], 24, ignore_eos=True).text


def http_generate_stream(server: Served, reference: Reference):
    """16 streams over Triton's HTTP generate extension, 8 at a time."""
    def one(i):
        with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=60,
                          json={"text_input": PROMPTS[i % 4], "max_tokens": 24 + i, "stream": True,
                                "ignore_eos": True}) as r:
            events = sse_events(r)
        assert events[-1]["finish_reason"] == "length"
        return "".join(e["text_output"] for e in events)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts[1] == reference(PROMPTS[1], 25, ignore_eos=True).text


def grpc_streaming(server: Served, reference: Reference):
    """16 gRPC streams, 8 at a time, each closed as a client should: not cancelled after its final response."""
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: grpc_request(server, "llama", text_input=PROMPTS[i % 4],
                                                       max_tokens=24 + i, ignore_eos=True), range(16)))
    assert all(error is None and finals == 1 for _, error, finals in results)
    text = "".join(r.as_numpy("text_output")[0].decode() for r in results[2][0])
    assert text == reference(PROMPTS[2], 26, ignore_eos=True).text


def non_streaming(server: Served, reference: Reference):
    """16 non-streaming OpenAI completions and 8 Triton generate calls, all at once."""
    def completion(i):
        r = httpx.post(server.endpoints["openai"] + "/completions", timeout=60,
                       json={"prompt": PROMPTS[i % 4], "max_tokens": 20, "temperature": 0})
        assert r.status_code == 200
        return r.json()["choices"][0]["text"]

    def generate(i):
        r = httpx.post(f"{server.http}/v2/models/llama/generate", timeout=60,
                       json={"text_input": PROMPTS[i % 4], "max_tokens": 20, "exclude_input_in_output": True})
        assert r.status_code == 200
        return r.json()["text_output"]

    with ThreadPoolExecutor(24) as pool:
        texts = list(pool.map(lambda i: completion(i) if i < 16 else generate(i), range(24)))
    want = reference(PROMPTS[3], 20).text
    assert texts[3] == want and texts[19] == want


def vanishing_clients(server: Served, reference: Reference):
    """12 clients that go away after the first streamed piece: OpenAI SSE, HTTP generate_stream, gRPC (cancel)."""
    cancelled = 'llama_requests_total{finish_reason="cancelled",model="llama"}'
    before = server.metrics().get(cancelled, 0)

    def one(i):
        body = {"max_tokens": WINDOW - 16, "ignore_eos": True, "stream": True}
        if i % 3 == 0:
            with httpx.stream("POST", server.endpoints["openai"] + "/completions", timeout=60,
                              json={**body, "prompt": PROMPTS[i % 4], "temperature": 0}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
        elif i % 3 == 1:
            with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=60,
                              json={**body, "text_input": PROMPTS[i % 4]}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
        else:
            grpc_request(server, "llama", cancel_after=1, text_input=PROMPTS[i % 4], max_tokens=WINDOW - 16,
                         ignore_eos=True)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(12)))
    # over HTTP a client gone is noticed at the next write, so each of them ends cancelled, not at its length
    assert server.wait_metric(cancelled, lambda v: v >= before + 12, timeout=30) == before + 12


MALFORMED_OPENAI = [b"{not json", b"[1, 2]", json.dumps({"prompt": 5}).encode(),
                    json.dumps({"prompt": "x", "max_tokens": "many"}).encode(),
                    json.dumps({"prompt": "x", "temperature": -1}).encode(),
                    json.dumps({"prompt": "x", "top_p": 7}).encode(),
                    json.dumps({"prompt": "word " * 40_000}).encode(),  # 200,000 characters
                    json.dumps({"prompt": "x", "max_tokens": 100_000}).encode(),
                    json.dumps({"prompt": "x", "n": 3}).encode(),
                    json.dumps({"prompt": [10**9]}).encode()]
MALFORMED_TRITON = [{"max_tokens": 5}, {"text_input": "Hi", "max_tokens": 0}, {"text_input": "Hi", "top_p": 0.0},
                    {"text_input": "Hi", "stop": [""]}]


def malformed_requests(server: Served, reference: Reference):
    """14 malformed requests at once, each answered with a one-line 4xx, among 4 good ones."""
    def bad(i):
        if i < len(MALFORMED_OPENAI):
            r = httpx.post(server.endpoints["openai"] + "/completions", content=MALFORMED_OPENAI[i], timeout=60,
                           headers={"content-type": "application/json"})
            message = r.json()["error"]["message"]
        else:
            r = httpx.post(f"{server.http}/v2/models/llama/generate", json=MALFORMED_TRITON[i - len(MALFORMED_OPENAI)],
                           timeout=60)
            message = r.json()["error"]
        assert 400 <= r.status_code < 500 and message and "\n" not in message, (r.status_code, message)

    def good(i):
        return httpx.post(f"{server.http}/v2/models/llama/generate", timeout=60,
                          json={"text_input": PROMPTS[i], "max_tokens": 12, "exclude_input_in_output": True})

    with ThreadPoolExecutor(18) as pool:
        bads = [pool.submit(bad, i) for i in range(len(MALFORMED_OPENAI) + len(MALFORMED_TRITON))]
        goods = [pool.submit(good, i) for i in range(4)]
        [f.result() for f in bads]
        assert goods[0].result().json()["text_output"] == reference(PROMPTS[0], 12).text


def busy_burst(server: Served, reference: Reference):
    """12 requests at once to `tight` (one slot, a queue of one), over HTTP and gRPC: most are refused as busy."""
    def one(i):
        if i % 2:
            r = httpx.post(f"{server.http}/v2/models/tight/generate", timeout=60,
                           json={"text_input": PROMPTS[i % 4], "max_tokens": 200, "ignore_eos": True})
            return None if r.status_code == 200 else r.json()["error"]
        _, error, finals = grpc_request(server, "tight", text_input=PROMPTS[i % 4], max_tokens=200, ignore_eos=True)
        return error

    with ThreadPoolExecutor(12) as pool:
        errors = list(pool.map(one, range(12)))
    refused = [e for e in errors if e is not None]
    assert len(refused) >= 6 and all("the queue is full" in str(e) for e in refused), errors


LOADS = [openai_streaming, http_generate_stream, grpc_streaming, non_streaming, vanishing_clients,
         malformed_requests, busy_burst]


def grpc_request(server: Served, model: str, cancel_after: int | None = None, on_first=None, **values):
    """One request over a gRPC stream (tritonclient.grpc): (its responses, its error, how many responses were
    final). Unless cancelled after `cancel_after` responses, the stream is closed without cancelling, and the
    server must end it: a request that never got its final response would keep it open. `on_first()` is called
    once the first response has come."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, infer_inputs(grpcclient, stream=True, **values),
                              enable_empty_final_response=True)
    responses, error, finals = [], None, 0
    while True:
        result, err = got.get(timeout=60)
        if err is not None:  # an error is the request's final response
            error, finals = err, finals + 1
            break
        responses.append(result)
        finals += is_final(result)
        if on_first is not None and len(responses) == 1:
            on_first()
        if is_final(result) or (cancel_after is not None and len(responses) >= cancel_after):
            break
    closer = threading.Thread(target=client.stop_stream, kwargs={"cancel_requests": cancel_after is not None})
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "the server did not end the stream after the request's final response"
    client.close()
    if cancel_after is None:
        try:  # nothing more may come: a second final response would be here
            extra = got.get(timeout=0.2)
            raise AssertionError(f"a response after the final one: {extra}")
        except queue.Empty:
            pass
    return responses, error, finals


# ---- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", LOADS, ids=[load.__name__ for load in LOADS])
def test_after_each_load_sigterm_exits_0_in_seconds_leaving_nothing(repo, reference, load, tmp_path):
    took = []
    for i in range(REPEAT):
        log = tmp_path / f"server-{i}.log"
        server = serve(repo, log)
        try:
            load(server, reference)
            wait_idle(server)
            assert server.ready()
        except BaseException:
            server.stop()
            raise
        took.append(stop_cleanly(server, log))
    print(f"{load.__name__}: stop times {', '.join(f'{t:.1f}' for t in took)} s")


def test_requests_in_flight_finish_before_the_stop(repo, reference, tmp_path):
    """SIGTERM while 3 long streams run (OpenAI, HTTP, gRPC): each gets its whole answer, a request sent during
    the drain is refused, and the stop reports 3 requests open that ended at their length."""
    log = tmp_path / "server.log"
    server = serve(repo, log, "--drain-timeout", "25")
    n = WINDOW - 12
    answers, first = {}, threading.Barrier(4)

    def openai_stream():
        with httpx.stream("POST", server.endpoints["openai"] + "/completions", timeout=120,
                          json={"prompt": PROMPTS[0], "max_tokens": n, "temperature": 0, "stream": True,
                                "ignore_eos": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            pieces = [next(lines)]
            first.wait(30)
            pieces += list(lines)
        answers["openai"] = "".join(json.loads(p[6:])["choices"][0]["text"] for p in pieces[:-1])

    def http_stream():
        with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=120,
                          json={"text_input": PROMPTS[1], "max_tokens": n, "stream": True, "ignore_eos": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            pieces = [next(lines)]
            first.wait(30)
            pieces += list(lines)
        answers["http"] = "".join(json.loads(p[6:])["text_output"] for p in pieces)

    def grpc_stream():
        responses, error, _ = grpc_request(server, "llama", on_first=lambda: first.wait(30), text_input=PROMPTS[2],
                                           max_tokens=n, ignore_eos=True)
        answers["grpc"] = "".join(r.as_numpy("text_output")[0].decode() for r in responses)

    threads = [threading.Thread(target=f) for f in (openai_stream, http_stream, grpc_stream)]
    for t in threads:
        t.start()
    try:
        first.wait(60)  # each of the three has its first piece
        server.process.send_signal(15)
        deadline = time.monotonic() + 10
        while "stopping" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = httpx.post(f"{server.http}/v2/models/llama/generate", timeout=30,
                             json={"text_input": PROMPTS[3], "max_tokens": 4})
        for t in threads:
            t.join(120)
        assert server.process.wait(60) == 0
    finally:
        code = server.stop()
    assert code == 0, server.stderr
    assert refused.status_code == 400 and "the server is stopping" in refused.json()["error"]
    for key, prompt in (("openai", PROMPTS[0]), ("http", PROMPTS[1]), ("grpc", PROMPTS[2])):
        assert answers[key] == reference(prompt, n, ignore_eos=True).text, key
    assert re.search(r"^llama: 3 requests open at the stop; ended since: 3 length \(drained in", server.stderr,
                     re.M), server.stderr
    assert not pid_alive(server.server_pid) and not server.leftover_shm()


def test_requests_in_flight_are_cancelled_at_the_drain_timeout(repo, reference, tmp_path):
    """--drain-timeout 0: SIGTERM while 4 streams run ends them at once (finish_reason cancelled, each answer a
    prefix of its solo run), then exit 0 within seconds."""
    log = tmp_path / "server.log"
    server = serve(repo, log, "--drain-timeout", "0")
    n = WINDOW - 12
    answers, first = {}, threading.Barrier(5)

    def stream(i):
        with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=120,
                          json={"text_input": PROMPTS[i], "max_tokens": n, "stream": True, "ignore_eos": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            events = [json.loads(next(lines)[6:])]
            first.wait(30)
            events += [json.loads(line[6:]) for line in lines]
        answers[i] = events

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        first.wait(60)
        started = time.monotonic()
        server.process.send_signal(15)
        code = server.process.wait(60)
        took = time.monotonic() - started
        for t in threads:
            t.join(30)
    finally:
        server.stop()
    assert code == 0 and took < STOP_LIMIT_S, (code, took, server.stderr)
    for i, events in answers.items():
        want = reference(PROMPTS[i], n, ignore_eos=True)
        text = "".join(e["text_output"] for e in events)
        assert events[-1]["finish_reason"] == "cancelled" and want.text.startswith(text) and text != want.text
    assert re.search(r"^llama: 4 requests open at the stop; ended since: 4 cancelled", server.stderr, re.M), \
        server.stderr
    assert not pid_alive(server.server_pid) and not server.leftover_shm()


FAULTY_MODEL = '''
"""The served model with injected faults: a prefill of a prompt starting with PREFILL raises; after a prefill of one
starting with DECODE the next decode step raises (no kept slot starts with either, so each is prefilled whole)."""
from llama_export.runtime.serving import model as served

PREFILL, DECODE = 7, 8


class TritonPythonModel(served.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        backend = self.batcher.backend
        step_rows, armed = backend.step_rows, []

        def faulty(cache, start, stop, ids):
            if ids.shape[1] > 1 and ids[0, 0] == PREFILL:
                raise RuntimeError("injected prefill fault")
            if ids.shape[1] > 1 and ids[0, 0] == DECODE:
                armed.append(True)
            elif ids.shape[1] == 1 and armed:
                armed.clear()
                raise RuntimeError("injected decode fault")
            return step_rows(cache, start, stop, ids)

        backend.step_rows = faulty
'''


def test_every_request_path_ends_with_exactly_one_final_response(artifact, reference, tmp_path):
    """Over gRPC (the final flag is visible there), each way a request can end gets exactly one final response and
    the server then closes the stream: a stop string (tiny never samples its end-of-sequence token), its length, bad
    input, refused as busy, a failing prefill and a failing decode step; a cancelled request and a client gone end
    too (the open-requests gauge returns to 0). Then the stop is clean."""
    repo = tmp_path / "repo"
    target = write_repository(artifact, repo, "llama", slots=2, queue=1, threads=1)
    (target / "1" / "model.py").write_text(FAULTY_MODEL)
    log = tmp_path / "server.log"
    server = Served(repo, "--log", str(log))
    try:
        stop_word = reference(PROMPTS[0], 30).text.split()[2]
        cases = {"stop string": dict(text_input=PROMPTS[0], max_tokens=30, stop=[stop_word]),
                 "length": dict(text_input=PROMPTS[1], max_tokens=9),
                 "bad input": dict(text_input=PROMPTS[1], max_tokens=WINDOW),
                 "failing prefill": dict(input_ids=[7, 20, 30], max_tokens=5),
                 "failing decode": dict(input_ids=[8, 20, 30], max_tokens=5)}
        reasons = {}
        for case, values in cases.items():
            responses, error, finals = grpc_request(server, "llama", **values)
            assert finals == 1, case
            reasons[case] = str(error) if error is not None else \
                responses[-1].as_numpy("finish_reason")[0].decode()
        assert reasons["stop string"] == "stop"
        assert reasons["length"] == "length" and "past the context window" in reasons["bad input"]
        assert "injected prefill fault" in reasons["failing prefill"]
        assert "injected decode fault" in reasons["failing decode"]
        # refused as busy: 2 slots and a queue of 1 hold 3 long requests; a 4th and 5th are refused
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda i: grpc_request(server, "llama", text_input=PROMPTS[i % 4],
                                                           max_tokens=WINDOW - 16, ignore_eos=True), range(5)))
        assert all(finals == 1 for _, _, finals in results)
        assert sum("the queue is full" in str(error) for _, error, _ in results if error is not None) >= 1
        # cancelled mid-stream (gRPC) and a client gone (HTTP): no final response reaches them; the model ends them
        grpc_request(server, "llama", cancel_after=2, text_input=PROMPTS[2], max_tokens=WINDOW - 16)
        with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=60,
                          json={"text_input": PROMPTS[2], "max_tokens": WINDOW - 16, "stream": True}) as r:
            next(r.iter_lines())
        metrics = server.wait_metric('llama_requests_total{finish_reason="cancelled",model="llama"}',
                                     lambda v: v >= 2)
        assert metrics == 2
        assert server.wait_metric(OPEN % "llama", lambda v: v == 0) == 0
        assert server.metrics()['llama_requests_total{finish_reason="error",model="llama"}'] == 2
    finally:
        code = server.stop()
    assert code == 0 and re.search(r"^llama: finalized in [\d.]+ s \(0 requests not ended\)$", server.stderr,
                                   re.M), server.stderr
    assert not server.leftover_shm()


def test_a_grpc_client_that_cancels_after_its_final_response_does_not_hang_the_stop(repo, tmp_path):
    """tritonserver 2.51 never releases a gRPC stream cancelled just after its final response was written, and
    waits out its exit timeout for it. llama-serve's own clients never do that; for a third-party client that
    does, every request has still ended, so llama-serve stops the server after a bounded wait and exits 0."""
    import tritonclient.grpc as grpcclient

    log = tmp_path / "server.log"
    server = serve(repo, log)

    def rude(i):
        client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("llama", infer_inputs(grpcclient, text_input=PROMPTS[i % 4], max_tokens=64,
                                                        stream=True, ignore_eos=True),
                                  enable_empty_final_response=True)
        while not is_final(got.get(timeout=60)[0]):
            pass
        client.stop_stream(cancel_requests=True)  # after the final response
        client.close()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(rude, range(16)))
        wait_idle(server)
    finally:
        started = time.monotonic()
        code = server.stop(timeout=120)
        took = time.monotonic() - started
    assert code == 0 and took < STOP_LIMIT_S + 8, (took, server.stderr)
    assert "0 requests open at the stop" in server.stderr
    assert not pid_alive(server.server_pid) and not server.leftover_shm()
