"""Triton serving on a real tritonserver (127.0.0.1): HTTP generate / generate_stream, gRPC streaming and the
OpenAI endpoint answer exactly what llama-generate answers; concurrency, cancellation, bad requests, metrics."""

from __future__ import annotations

import glob
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from llama_export.runtime import serving
from llama_export.runtime.artifact_format import manifest_bytes
from llama_export.runtime.chat import chat_prompt_ids
from llama_export.runtime.sampling import SamplingParams
from llama_export.runtime.serving.client import infer_inputs, is_final
from llama_export.runtime.serving.repository import write_repository
from serving_helpers import (SHM, WINDOW, Served, artifact, orphaned_shm, pid_alive,  # noqa: F401 (fixtures)
                             reference, sse_events)

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

PROMPTS = ["A list comprehension", "The tutorial explains how", "Tuples are", "Once upon a time",
           "Errors and exceptions", "The with statement", "Classes provide", "Modules"]
SLOTS = 4


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository(artifact, repo, "llama", slots=SLOTS, queue=32, threads=1)
    write_repository(artifact, repo, "tight", slots=1, queue=1, threads=1,  # for the full queue
                     prefix_reuse=False, prefill_chunk=8)
    server = Served(repo, "--openai", "0", "--model", "llama")
    yield server
    assert server.stop() == 0, server.stderr
    assert not pid_alive(server.server_pid)
    assert not server.leftover_shm()


def generate(served, payload, model="llama"):
    return httpx.post(f"{served.http}/v2/models/{model}/generate", json=payload, timeout=60)


def generate_stream(served, payload, model="llama"):
    with httpx.stream("POST", f"{served.http}/v2/models/{model}/generate_stream", json={**payload, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        return sse_events(r)


def grpc_stream(served, prompt: str, max_tokens: int, cancel_after: int | None = None, model="llama"):
    """Responses of one gRPC stream (tritonclient.grpc); with cancel_after, cancelled after that many."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.endpoints["grpc"])
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    inputs = infer_inputs(grpcclient, text_input=prompt, max_tokens=max_tokens, stream=True)
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    responses = []
    try:
        while True:
            result, error = got.get(timeout=60)
            assert error is None, error
            responses.append(result)
            if cancel_after is not None and len(responses) >= cancel_after:
                return responses
            if is_final(result):
                return responses
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()


def joined(responses) -> tuple[str, list[int], str]:
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses if r.as_numpy("text_output") is not None)
    tokens = [int(t) for r in responses if r.as_numpy("token_ids") is not None for t in r.as_numpy("token_ids")]
    return text, tokens, responses[-1].as_numpy("finish_reason")[0].decode()


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_text_equals_llama_generate_over_http_sse_and_grpc(served, reference, prompt):
    want = reference(prompt, 40)
    whole = generate(served, {"text_input": prompt, "max_tokens": 40, "exclude_input_in_output": True}).json()
    assert (whole["text_output"], whole["token_ids"], whole["finish_reason"]) == (want.text, want.tokens,
                                                                                  want.finish_reason)
    with_prompt = generate(served, {"text_input": prompt, "max_tokens": 40}).json()
    assert with_prompt["text_output"] == prompt + want.text  # vLLM's default: the prompt before the answer
    events = generate_stream(served, {"text_input": prompt, "max_tokens": 40})
    assert len(events) > 5  # streamed piece by piece, not one answer
    tokens = [t for e in events for t in (e["token_ids"] if isinstance(e["token_ids"], list) else [e["token_ids"]])]
    assert "".join(e["text_output"] for e in events) == want.text and tokens == want.tokens
    assert events[-1]["finish_reason"] == want.finish_reason and all(e["finish_reason"] == "" for e in events[:-1])
    assert joined(grpc_stream(served, prompt, 40)) == (want.text, want.tokens, want.finish_reason)


def test_multibyte_characters_arrive_whole(served, reference):
    """A seeded sampled answer with non-ASCII text (byte-fallback tokens) equals its solo run, streamed too."""
    for seed in range(40):
        params = SamplingParams(temperature=1.5, seed=seed)
        want = reference("Unicode: café, naïve, 日本", 48, params)
        if any(127 < ord(c) != 0xFFFD for c in want.text):  # a real multi-byte character, not an invalid byte
            break
    else:
        pytest.fail("no seed in 0..39 gave a non-ASCII answer to check")
    payload = {"text_input": "Unicode: café, naïve, 日本", "max_tokens": 48, "temperature": 1.5, "seed": seed}
    assert generate(served, {**payload, "exclude_input_in_output": True}).json()["text_output"] == want.text
    events = generate_stream(served, payload)
    assert "".join(e["text_output"] for e in events) == want.text and len(events) > 5


def test_stop_strings_and_max_tokens(served, reference):
    full = reference(PROMPTS[0], 40)
    stop = full.text.split()[3]  # a word from the middle of the answer
    want = reference(PROMPTS[0], 40, stop=(stop, "never-there"))
    assert want.finish_reason == "stop" and len(want.text) < len(full.text)
    got = generate(served, {"text_input": PROMPTS[0], "max_tokens": 40, "stop": [stop, "never-there"],
                            "exclude_input_in_output": True}).json()
    assert (got["text_output"], got["finish_reason"]) == (want.text, "stop")
    events = generate_stream(served, {"text_input": PROMPTS[0], "max_tokens": 40, "stop": [stop]})
    assert "".join(e["text_output"] for e in events) == want.text and events[-1]["finish_reason"] == "stop"
    short = generate(served, {"text_input": PROMPTS[0], "max_tokens": 7, "exclude_input_in_output": True}).json()
    assert len(short["token_ids"]) == 7 and short["finish_reason"] == "length"
    assert short["token_ids"] == full.tokens[:7]


def test_openai_client_completions_and_chat(served, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.endpoints["openai"], api_key="unused")
    want = reference(PROMPTS[1], 30)
    r = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(reference.tokenizer.encode(PROMPTS[1])), 30)
    chunks = list(client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text and len(chunks) > 5
    dialog = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"}]
    want = reference.ids(chat_prompt_ids(reference.tokenizer, dialog), 40, stop=("\n\n",))
    r = client.chat.completions.create(model="llama", messages=dialog, max_tokens=40, temperature=0, stop="\n\n")
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.tokens)
    stream = client.chat.completions.create(model="llama", messages=dialog, max_tokens=40, temperature=0,
                                            stop=["\n\n"], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.tokens)
    with httpx.stream("POST", served.endpoints["openai"] + "/chat/completions", timeout=60,
                      json={"messages": dialog, "max_tokens": 5, "stream": True}) as r:
        assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]
    with pytest.raises(openai.BadRequestError, match="top_p=1.5 must be in"):
        client.completions.create(model="llama", prompt="x", max_tokens=3, top_p=1.5)


def test_sixteen_concurrent_streams_equal_their_solo_runs(served, reference):
    jobs = [(PROMPTS[i % len(PROMPTS)], 24 + 3 * i) for i in range(16)]
    wants = [reference(p, n) for p, n in jobs]
    steps_before = served.metrics().get('llama_steps_total{model="llama"}', 0)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: generate_stream(served, {"text_input": job[0], "max_tokens": job[1]}),
                                jobs))
    for events, want in zip(answers, wants):
        assert "".join(e["text_output"] for e in events) == want.text
        assert events[-1]["finish_reason"] == want.finish_reason
    metrics = served.metrics()
    assert metrics['llama_max_running_in_a_step{model="llama"}'] == SLOTS  # requests shared steps
    steps = metrics['llama_steps_total{model="llama"}'] - steps_before
    assert steps < sum(len(w.tokens) for w in wants), steps  # fewer steps than tokens: steps were shared


def test_cancelling_frees_the_slot(served, reference):
    key = 'llama_requests_total{finish_reason="cancelled",model="llama"}'
    before = served.metrics().get(key, 0)
    long = WINDOW - 10
    assert len(grpc_stream(served, PROMPTS[2], long, cancel_after=3)) == 3  # gRPC cancel mid-stream
    assert served.wait_metric(key, lambda v: v >= before + 1) == before + 1
    with httpx.stream("POST", f"{served.http}/v2/models/llama/generate_stream", timeout=60,
                      json={"text_input": PROMPTS[3], "max_tokens": long, "stream": True}) as r:
        next(r.iter_lines())  # one event, then the client goes away
    assert served.wait_metric(key, lambda v: v >= before + 2) == before + 2
    with httpx.stream("POST", served.endpoints["openai"] + "/completions", timeout=60,  # OpenAI streaming client gone
                      json={"prompt": PROMPTS[5], "max_tokens": long, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    assert served.wait_metric(key, lambda v: v >= before + 3) == before + 3
    assert served.wait_metric('llama_running_slots{model="llama"}', lambda v: v == 0) == 0
    want = reference(PROMPTS[4], 20)
    assert generate(served, {"text_input": PROMPTS[4], "max_tokens": 20,
                             "exclude_input_in_output": True}).json()["text_output"] == want.text


@pytest.mark.parametrize("payload, message", [
    ({"max_tokens": 5}, "text_input is missing"),
    ({"text_input": "Hi", "max_tokens": 0}, "max_tokens=0 must be at least 1"),
    ({"text_input": "Hi", "max_tokens": WINDOW}, f"max_tokens={WINDOW} is past the context window: the prompt has 3 "
                                                 f"tokens and the window is {WINDOW}, so max_tokens can be at most"),
    ({"text_input": "word " * WINDOW}, f"context window is {WINDOW} tokens"),
    ({"text_input": "Hi", "temperature": -0.5}, "temperature=-0.5 must be >= 0"),
    ({"text_input": "Hi", "top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
    ({"text_input": "Hi", "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ({"text_input": "Hi", "stop": [""]}, "stop: a stop string is empty"),
])
def test_bad_requests_name_the_input_and_limit(served, payload, message):
    r = generate(served, payload)
    assert r.status_code == 400 and message in r.json()["error"]
    assert served.ready()


def test_wrong_dtype_is_named(served):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.endpoints["grpc"])
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put(error))
    max_tokens = grpcclient.InferInput("max_tokens", [1], "FP32")  # the model declares INT32
    max_tokens.set_data_from_numpy(np.array([4.0], np.float32))
    client.async_stream_infer("llama", [*infer_inputs(grpcclient, text_input="Hi"), max_tokens],
                              enable_empty_final_response=True)
    error = got.get(timeout=30)
    client.stop_stream()
    client.close()
    assert error is not None and "input 'max_tokens' data-type is 'FP32', but model 'llama' expects 'INT32'" in str(error)
    assert served.ready()


def test_full_queue_is_refused_and_the_server_stays_ready(served, reference):
    """Model `tight` has one slot and a queue of one: of six requests sent at once, those past the first two are
    told the queue is full; the admitted ones finish."""
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: generate(served, {"text_input": p, "max_tokens": WINDOW - 10}, "tight"),
                                PROMPTS[:6]))
    refused = [r for r in replies if r.status_code == 400]
    assert 1 <= len(refused) <= 4
    assert all("the queue is full (1 requests waiting, --queue 1)" in r.json()["error"] for r in refused)
    assert all(r.json()["finish_reason"] == "length" for r in replies if r.status_code == 200)
    assert served.ready()


# ---- the repository writer and the server's lifecycle (short-lived servers of their own) ----------------------


def test_config_is_generated_valid_and_complete(artifact, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from llama_export.runtime.serving.repository import model_config

    target = write_repository(artifact, tmp_path / "repo", "m", slots=3, queue=5, threads=2)
    config = text_format.Parse((target / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == "m" and config.backend == "python" and config.model_transaction_policy.decoupled
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert {i.name: mc.DataType.Name(i.data_type) for i in config.input}["text_input"] == "TYPE_STRING"
    assert {o.name for o in config.output} == {"text_output", "token_ids", "finish_reason", "cached_tokens"}
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["SLOTS"] == "3" and params["QUEUE"] == "5" and params["EXECUTION_ENV_PATH"] == sys.prefix
    assert params["PREFIX_REUSE"] == "1" and params["PREFILL_CHUNK"] == "256"
    assert (target / "1" / "model.py").read_text() == (Path(serving.__file__).parent / "model.py").read_text()
    gpu = model_config("m", str(artifact), 4, 8, None, "trt", None)
    assert [g.kind for g in gpu.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def run_cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / args[0]), *map(str, args[1:])], capture_output=True,
                          text=True, timeout=120)


def test_llama_triton_refuses_what_it_cannot_serve(artifact, tmp_path):
    portable = tmp_path / "portable"
    shutil.copytree(artifact, portable)
    manifest = json.loads((portable / "manifest.json").read_text())
    manifest["graph"]["flavour"] = "portable"
    (portable / "manifest.json").write_bytes(manifest_bytes(manifest))
    r = run_cli("llama-triton", portable, "-o", tmp_path / "repo")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "a portable artifact" in r.stderr and "--kv-cache static --max-seq-len N" in r.stderr
    assert not (tmp_path / "repo" / "llama").exists()
    r = run_cli("llama-triton", artifact, "-o", tmp_path / "repo", "--backend", "trt")
    assert r.returncode == 2 and "no TensorRT engine (model.plan); build one with llama-build" in r.stderr
    assert run_cli("llama-triton", artifact, "-o", tmp_path / "repo").returncode == 0
    r = run_cli("llama-triton", artifact, "-o", tmp_path / "repo")
    assert r.returncode == 2 and "already exists; remove it, pick another --name, or pass --force" in r.stderr


def test_trt_repository_serves_where_tensorrt_is(artifact):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here: the trt repository is generated and "
                                           "validated (test_config_is_generated_valid_and_complete), not served")
    if not (Path(artifact) / "model.plan").is_file():
        pytest.skip("the served tiny artifact is exported for ONNX Runtime; a trt one needs llama-build on a GPU")


def test_sigterm_drains_streams_and_leaves_nothing(artifact, reference, tmp_path):
    """A --copy repository moved elsewhere and served from another directory; SIGTERM while three streams are in
    flight: each stream still gets its whole answer, llama-serve exits 0, no process or /dev/shm segment is left."""
    write_repository(artifact, tmp_path / "made", "llama", slots=2, queue=4, threads=1, copy=True)
    os.rename(tmp_path / "made", tmp_path / "moved")
    server = Served(tmp_path / "moved")
    n = WINDOW - 12
    started, answers = threading.Barrier(4), {}

    def stream(prompt):
        with httpx.stream("POST", f"{server.http}/v2/models/llama/generate_stream", timeout=120,
                          json={"text_input": prompt, "max_tokens": n, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started.wait(30)
            answers[prompt] = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: ")]

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS[:3]]
    for t in threads:
        t.start()
    try:
        started.wait(60)
        assert server.process.poll() is None
        assert server.stop() == 0, server.stderr
    finally:
        server.stop()
    for t in threads:
        t.join(60)
    for prompt in PROMPTS[:3]:
        assert "".join(e["text_output"] for e in answers[prompt]) == reference(prompt, n).text
    assert not pid_alive(server.server_pid) and not server.leftover_shm()


def test_model_that_cannot_load_ends_llama_serve_with_the_reason(artifact, tmp_path):
    target = write_repository(artifact, tmp_path / "repo", "broken", copy=True)
    with open(target / "1" / "artifact" / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    shm_before = set(glob.glob(SHM))
    start = time.monotonic()
    r = run_cli("llama-serve", tmp_path / "repo", "--timeout", "60", "--log", tmp_path / "server.log")
    assert r.returncode == 1 and "Traceback (most recent call last)" not in r.stderr.splitlines()[0]
    assert "model.onnx.data: 1000 bytes, the manifest says" in r.stderr and "broken" in r.stderr
    assert time.monotonic() - start < 60
    assert not orphaned_shm(shm_before)


def test_example_client_streams_the_chat_answer_over_grpc_and_sse(served, reference):
    want = reference("[INST] What is a tuple? [/INST]", 30).text
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "triton_client.py"),
                        "What is a tuple?", "--http", served.http, "--grpc", served.endpoints["grpc"],
                        "--max-tokens", "30"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"--- gRPC ({served.endpoints['grpc']})\n{want}\n"
                        f"--- HTTP SSE ({served.http})\n{want}\n")


def test_a_stub_that_cannot_start_ends_in_the_timeout_not_a_hang(artifact, tmp_path):
    """A model environment whose activate script fails: the Python stub never starts and tritonserver would wait
    forever; llama-serve stops it at --timeout with the reason, leaving no process and no /dev/shm segment."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text("exit 3\n")
    target = write_repository(artifact, tmp_path / "repo", "llama")
    config = text_format.Parse((target / "config.pbtxt").read_text(), mc.ModelConfig())
    config.parameters["EXECUTION_ENV_PATH"].string_value = str(env)
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    shm_before = set(glob.glob(SHM))
    start = time.monotonic()
    r = run_cli("llama-serve", tmp_path / "repo", "--timeout", "6", "--log", tmp_path / "server.log")
    assert r.returncode == 1 and "tritonserver was not ready within 6 s" in r.stderr
    assert time.monotonic() - start < 6 + 20
    assert not orphaned_shm(shm_before)


def test_serve_bench_counts_every_token(served):
    """examples/serve_bench.py through Triton: every request's tokens arrive (ignore_eos), and the server's RSS is
    read before and after a run."""
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "serve_bench.py"), "triton",
                        served.endpoints["grpc"], "--clients", "1,4", "--requests", "6", "--prompt-tokens", "16",
                        "--new-tokens", "12", "--vocab", "4096", "--warmup", "1", "--server-pid",
                        str(served.server_pid), "--rss-requests", "8", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(lv["clients"], lv["requests"], lv["tokens"]) for lv in report["levels"]] == [(1, 6, 72), (4, 6, 72)]
    assert report["rss"]["run"]["tokens"] == 8 * 12 and report["rss"]["before_mb"] > 50


def test_llama_serve_takes_an_artifact_directly(artifact, reference):
    server = Served(artifact, "--slots", "2", "--threads", "1")
    try:
        assert server.endpoints["models"] == ["llama"]
        got = generate(server, {"text_input": PROMPTS[6], "max_tokens": 16, "exclude_input_in_output": True}).json()
        assert got["text_output"] == reference(PROMPTS[6], 16).text
    finally:
        assert server.stop() == 0, server.stderr
    assert not pid_alive(server.server_pid) and not server.leftover_shm()


def test_a_conversation_reuses_the_slot_it_left_through_the_openai_endpoint(served, reference):
    """Each turn re-sends the conversation: from the second turn the prompt's kept prefix is reused (usage's
    prompt_tokens_details.cached_tokens, the model's hit counter) and the answer equals the solo run; llama.cpp's
    cache_prompt: false reuses nothing and answers the same; a cache_prompt that is not a boolean is a 400."""
    url = served.endpoints["openai"] + "/completions"
    hits = 'llama_prefix_cache_hit_tokens_total{model="llama"}'
    before = served.metrics().get(hits, 0)
    ids = reference.tokenizer.encode("The tutorial explains how lists")
    cached_seen = []
    for turn in range(3):
        want = reference.ids(ids, 10)
        got = httpx.post(url, json={"prompt": ids, "max_tokens": 10, "temperature": 0}, timeout=60).json()
        plain = httpx.post(url, json={"prompt": ids, "max_tokens": 10, "temperature": 0, "cache_prompt": False},
                           timeout=60).json()
        assert got["choices"][0]["text"] == want.text == plain["choices"][0]["text"], turn
        assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached_seen.append(got["usage"]["prompt_tokens_details"]["cached_tokens"])
        ids = ids + want.tokens + reference.tokenizer.encode("And then")[1:]
    assert cached_seen[1] > 0 and cached_seen[2] > cached_seen[1], cached_seen
    assert served.wait_metric(hits, lambda v: v >= before + sum(cached_seen)) >= before + sum(cached_seen)
    # `tight` is served with --no-prefix-reuse and --prefill-chunk 8: the same conversation twice reuses nothing,
    # and its prompts (30 tokens and more) are prefilled in chunks to the same answer
    for _ in range(2):
        off = generate(served, {"input_ids": ids, "max_tokens": 4, "exclude_input_in_output": True}, "tight").json()
        assert off["cached_tokens"] == 0 and off["token_ids"] == reference.ids(ids, 4).tokens
    r = httpx.post(url, json={"prompt": "x", "cache_prompt": "no"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"] == "cache_prompt must be true or false, got 'no'"
    # vLLM's cache_salt: another salt shares nothing with this conversation, the same salt shares what it left
    salted = [httpx.post(url, json={"prompt": ids, "max_tokens": 4, "temperature": 0, "cache_salt": salt},
                         timeout=60).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
              for salt in ("tenant-a", "tenant-a")]
    assert salted[0] == 0 and salted[1] == len(ids) - 1, salted
    r = httpx.post(url, json={"prompt": "x", "cache_salt": 7}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"] == "cache_salt must be a string, got 7"
