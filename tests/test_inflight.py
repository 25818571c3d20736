"""In-flight batching (runtime/inflight.py) on real ONNX Runtime sessions: requests that join and leave a 4-slot
engine at staggered times give, token for token, their solo runs; cancellation, backpressure, bad input, faults."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.generation import generate
from llama_export.runtime.inflight import Busy, InflightBatcher, Request, RequestRejected
from llama_export.runtime.sampling import SamplingParams

from conftest import small_config

GQA = small_config(vocab_size=4096, max_position_embeddings=128, hidden_size=128, num_attention_heads=8,
                   num_key_value_heads=2)
WINDOW = 96


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    made = {}

    def get(case, target="ort"):
        """A static-cache artifact of `WINDOW` slots: `tiny` (trained) or a random GQA config (8/2 heads);
        target ort (GroupQueryAttention) or onnx (TensorScatter + Attention)."""
        if (case, target) not in made:
            ckpt = resolve_checkpoint("tiny") if case == "tiny" else RandomCheckpoint(GQA, seed=9)
            out = tmp_path_factory.mktemp(f"{case}-{target}") / "artifact"
            options = ExportOptions(target="ort" if target == "ort" else "onnx", kv_cache="static", max_seq_len=WINDOW)
            build_artifact(ckpt, out, options, tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
            artifact = Artifact.open(out)
            made[case, target] = (artifact, open_backend(artifact))
        return made[case, target]
    return get


def requests(count: int, seed: int = 0) -> list[Request]:
    """Prompts of 2..40 random ids and 12..24 new tokens, all different."""
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(3, 4000, int(rng.integers(2, 41))).tolist(), int(rng.integers(12, 25)))
            for _ in range(count)]


def solo(backend, tokenizer, request: Request):
    """The request's solo run: llama-generate's batch of one (no padding) on the same backend."""
    return generate(backend, tokenizer, [list(request.prompt)], backend.max_length, request.max_new_tokens,
                    request.params, request.stop_token_ids, request.stop_strings)[0]


def collect(handle, whole_characters: bool = True):
    """All of a handle's events, checked as a stream: the pieces add up, and (for a trained model, whose text is
    valid UTF-8; random weights may pick invalid byte sequences) no piece holds half a character."""
    events = list(handle)
    assert events[-1].final and not any(e.final for e in events[:-1])
    result = events[-1].result
    assert not whole_characters or all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == result.text
    assert [t for e in events for t in e.tokens] == result.tokens
    return result


@pytest.mark.parametrize("case, target", [("tiny", "ort"), ("gqa", "ort"), ("gqa", "onnx")])
def test_staggered_requests_equal_their_solo_runs(artifacts, tokenizer, case, target):
    artifact, backend = artifacts(case, target)
    work = requests(12)
    expected = [solo(backend, tokenizer, r) for r in work]
    with InflightBatcher(backend, tokenizer, slots=4) as batcher:
        handles = []
        for i, request in enumerate(work):  # each arrives once the one before has its first token: mid-run
            started = threading.Event()
            handles.append(batcher.submit(request, on_event=lambda event, started=started: started.set()))
            started.wait(30)
        results = [collect(h, whole_characters=case == "tiny") for h in handles]
        stats = batcher.stats()
    for request, got, want in zip(work, results, expected):
        assert got.tokens == want.tokens, request
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
        assert got.prompt_tokens == len(request.prompt) and got.ttft_s >= got.queued_s >= 0
        assert len(got.token_times_s) == max(len(got.tokens) - 1, 0)
    # requests shared steps: most decode steps ran several rows, never more than the slots
    assert stats["max_running_in_a_step"] == 4 and stats["requests_done"] == 12 and stats["prefills"] == 12
    shared = sum(count for rows, count in stats["rows_per_step"].items() if rows > 1)
    assert shared > stats["steps"] / 2 and stats["mean_occupancy"] > 0.5, stats
    assert stats["tokens_generated"] == sum(len(r.tokens) for r in results)
    print(f"{case}/{target}: {stats}")


def test_cancel_frees_the_slot_within_one_step(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    work = [Request(r.prompt, 40) for r in requests(5, seed=1)]
    expected = [solo(backend, tokenizer, r) for r in work]
    steps_at = {}
    with InflightBatcher(backend, tokenizer, slots=4) as batcher:
        def record(name, final_only=False):
            """Writes down the batcher's decode steps at the request's first token (or its final event)."""
            def on_event(event):
                if event.final or (event.tokens and not final_only):
                    steps_at.setdefault(name, batcher.stats()["steps"])
            return on_event

        handles = [batcher.submit(r, on_event=record(i, final_only=True)) for i, r in enumerate(work[:4])]
        waiting = batcher.submit(work[4], on_event=record("waiting"))  # no free slot until one leaves
        victim = handles[1]
        for count, event in enumerate(victim, 1):
            if count == 5:
                steps_at["cancel"] = batcher.stats()["steps"]
                victim.cancel()
                victim.cancel()  # idempotent
                break
        cancelled = victim.result(10)
        results = [h.result(30) for h in (handles[0], handles[2], handles[3], waiting)]
        stats = batcher.stats()
    assert cancelled.finish_reason == "cancelled" and 5 <= len(cancelled.tokens) < 40
    assert cancelled.tokens == expected[1].tokens[:len(cancelled.tokens)]
    # the victim left, and the waiting request took its slot (its first token came from its prefill), at the next
    # step after the cancel
    assert steps_at[1] <= steps_at["cancel"] + 1 and steps_at["waiting"] <= steps_at["cancel"] + 1, steps_at
    for got, want in zip(results, [expected[0], expected[2], expected[3], expected[4]]):
        assert got.tokens == want.tokens
    assert stats["max_running_in_a_step"] == 4 and stats["running"] == 0


def test_seeded_sampled_requests_equal_their_solo_runs(artifacts, tokenizer):
    artifact, backend = artifacts("tiny")
    prompts = [tokenizer.encode(p) for p in ("A list comprehension", "The tutorial explains how", "Hello")]
    work = [Request(prompts[0], 20, SamplingParams(temperature=1.0, top_p=0.9, seed=7)),
            Request(prompts[1], 16),
            Request(prompts[2], 24, SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, seed=3)),
            Request(prompts[0], 20, SamplingParams(temperature=1.0, top_p=0.9, seed=8))]
    expected = [solo(backend, tokenizer, r) for r in work]
    assert expected[0].tokens != expected[3].tokens  # the seed matters
    with InflightBatcher(backend, tokenizer, slots=4) as batcher:
        handles = [batcher.submit(r) for r in work]
        results = [collect(h) for h in handles]
    assert [r.tokens for r in results] == [e.tokens for e in expected]
    assert [r.text for r in results] == [e.text for e in expected]


def test_stop_strings_and_text_prompts(artifacts, tokenizer):
    artifact, backend = artifacts("tiny")
    free = solo(backend, tokenizer, Request(tokenizer.encode("A list comprehension"), 30))
    stop = free.text.strip()[:6]
    work = [Request("A list comprehension", 30, stop_strings=(stop,)),
            Request("A list comprehension", 30, stop_token_ids=(free.tokens[3],)),
            Request("emoji \U0001F9EC and 日本", 30, SamplingParams(temperature=1.0, seed=5))]
    with InflightBatcher(backend, tokenizer, slots=2) as batcher:
        results = [collect(batcher.submit(r)) for r in work]
    assert results[0].finish_reason == "stop" and stop not in results[0].text and free.text.startswith(results[0].text)
    assert results[1].tokens == free.tokens[:3] and results[1].finish_reason == "stop"
    assert results[2].tokens == solo(backend, tokenizer, Request(tokenizer.encode(work[2].prompt), 30,
                                                                   work[2].params)).tokens


def test_full_queue_and_bad_requests_are_refused(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    with InflightBatcher(backend, tokenizer, slots=1, max_queue=2) as batcher:
        first = batcher.submit(Request([5, 6, 7], 60))
        for event in first:  # running: the queue is empty again
            break
        queued = [batcher.submit(Request([5, 6], 4)) for _ in range(2)]
        with pytest.raises(Busy, match=r"busy: the waiting queue is full \(2 of 2 requests waiting for 1 slots\)"):
            batcher.submit(Request([5], 4))
        for bad, message in [
            (Request(list(range(5, 5 + WINDOW)), 4), f"a prompt has {WINDOW} tokens; the context window is {WINDOW}"),
            (Request([5] * 90, 10), f"prompt \\(90 tokens\\) \\+ max_new_tokens \\(10\\) exceeds the context window "
                                    f"of {WINDOW}; lower max_new_tokens to 6 or less"),
            (Request([5], 0), "max_new_tokens=0 must be at least 1"),
            (Request([5], 2.5), "max_new_tokens=2.5 must be an integer"),
            (Request([], 4), "a prompt is empty"),
            (Request([5, 4096], 4), r"prompt token id 4096 is outside the vocabulary \(0..4095\)"),
            (Request([5], 4, {"temperature": -1.0}), "sampling parameters: temperature=-1.0 must be >= 0"),
            (Request([5], 4, {"top_p": 2}), r"sampling parameters: top_p=2 must be in \(0, 1\]"),
            (Request([5], 4, stop_strings=("",)), "a stop string is empty"),
            (Request([5], 4, stop_token_ids=(-1,)), "stop token id -1 is outside the vocabulary"),
        ]:
            with pytest.raises(RequestRejected, match=message):
                batcher.submit(bad)
        first.cancel()
        assert [h.result(30).finish_reason for h in queued] == ["length", "length"]
        assert batcher.stats()["queued"] == 0


def test_llama_generate_batches_a_static_artifact_through_the_engine(artifacts, tokenizer):
    """Several --prompt on a static-cache artifact: each row equals its prompt's solo run, seeded sampling included
    (each prompt samples with a generator of its own)."""
    artifact, backend = artifacts("tiny")
    prompts = ["A list comprehension", "The tutorial explains how", "Hello"]
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", str(artifact.directory),
                          *[arg for p in prompts for arg in ("--prompt", p)], "--json", "--max-new-tokens", "12",
                          "--temperature", "0.9", "--seed", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    params = SamplingParams(temperature=0.9, seed=4)
    expected = [solo(backend, tokenizer, Request(tokenizer.encode(p), 12, params)) for p in prompts]
    assert [r["prompt"] for r in rows] == prompts
    assert [(r["tokens"], r["text"], r["finish_reason"]) for r in rows] == \
        [(e.tokens, e.text, e.finish_reason) for e in expected]


class FaultyBackend:
    """The real backend, made to raise in chosen steps: a prefill of a prompt that starts with `poison`, and the
    `decode_fault`-th decode step (the computation itself is real; only the fault is injected)."""

    def __init__(self, backend, poison: int, decode_fault: int):
        self.backend, self.poison, self.decode_fault, self.decodes = backend, poison, decode_fault, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step_rows(self, cache, start, stop, input_ids):
        if input_ids.shape[1] > 1 and input_ids[0, 0] == self.poison:
            raise RuntimeError("injected prefill fault")
        if input_ids.shape[1] == 1:
            self.decodes += 1
            if self.decodes == self.decode_fault:
                raise RuntimeError("injected decode fault")
        return self.backend.step_rows(cache, start, stop, input_ids)


def test_a_failing_step_fails_only_its_requests(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    poison = 4000
    work = requests(4, seed=2)
    expected = [solo(backend, tokenizer, r) for r in work]
    faulty = FaultyBackend(backend, poison, decode_fault=10 ** 9)
    with InflightBatcher(faulty, tokenizer, slots=2) as batcher:
        handles = [batcher.submit(work[0]), batcher.submit(Request([poison, 5, 6], 8)), batcher.submit(work[1])]
        results = [h.result(30) for h in handles]
        assert results[1].finish_reason == "error" and "injected prefill fault" in results[1].error
        assert results[1].tokens == [] and results[1].ttft_s is None
        assert [results[0].tokens, results[2].tokens] == [expected[0].tokens, expected[1].tokens]
        # a decode step that raises fails the rows it ran, and the engine serves the next requests
        faulty.decode_fault = faulty.decodes + 3
        long = [batcher.submit(Request(r.prompt, 20)) for r in work[2:]]
        failed = [h.result(30) for h in long]
        assert [r.finish_reason for r in failed] == ["error", "error"]
        assert all("injected decode fault" in r.error and len(r.tokens) >= 1 for r in failed)
        after = batcher.submit(work[3]).result(30)
        assert after.tokens == expected[3].tokens and after.finish_reason == expected[3].finish_reason
        assert batcher.stats()["errors"] == 3


def test_close_cancels_queued_and_running_requests(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    batcher = InflightBatcher(backend, tokenizer, slots=1)
    events = []
    running = batcher.submit(Request([5, 6, 7], 80), on_event=events.append)
    queued = batcher.submit(Request([5, 6], 4))
    next(iter(running))
    batcher.close()
    assert running.result(0).finish_reason == "cancelled" and queued.result(0).finish_reason == "cancelled"
    assert events[-1].final and events[-1].result.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(Request([5], 2))
    assert not any(t.name == "inflight-batcher" and t.is_alive() for t in threading.enumerate())


def test_open_refuses_a_portable_artifact(tmp_path):
    out = tmp_path / "portable"
    build_artifact(RandomCheckpoint(GQA, seed=9), out, ExportOptions(optimize=False),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    with pytest.raises(ValueError, match=r"a portable \(growing-cache\) artifact; the in-flight batcher serves "
                                         r"static-cache ones: re-export with `llama-export .* --kv-cache static"):
        InflightBatcher.open(out)


def test_trt_static_engine_serves_the_same_interface(tmp_path, tokenizer):
    """The trt backend's slot cache (runtime/backends/trt.py) under the batcher: each request equals its solo run
    on the same engine. Needs TensorRT 11 and a CUDA GPU; skips (saying which is missing) elsewhere."""
    from llama_export.exporter.trt_build import build_engine, tensorrt_status
    from llama_export.exporter.trt_profiles import limits

    here = tensorrt_status()
    if not here.usable:
        pytest.skip(f"needs TensorRT 11 and a CUDA GPU: {here.reason}")
    out = tmp_path / "trt"
    options = ExportOptions(target="trt", kv_cache="static", max_seq_len=WINDOW)
    manifest = build_artifact(RandomCheckpoint(GQA, seed=9), out, options, tokenizer=TINY_DIR / "tokenizer.model",
                              log=lambda m: None)
    build_engine(out, manifest, limits(manifest.graph, manifest.model.config, max_batch=4, max_input_len=64,
                                       max_seq_len=None), timing_cache=tmp_path / "timing.cache", log=lambda m: None)
    backend = open_backend(Artifact.open(out), "trt")
    work = requests(6, seed=3)
    expected = [solo(backend, tokenizer, r) for r in work]
    with InflightBatcher(backend, tokenizer, slots=4) as batcher:
        results = [h.result(120) for h in [batcher.submit(r) for r in work]]
        assert batcher.stats()["max_running_in_a_step"] == 4
    assert [r.tokens for r in results] == [e.tokens for e in expected]


def test_load_bench_reports_consistent_figures(artifacts):
    artifact, _ = artifacts("gqa")
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.load_bench", str(artifact.directory), "--concurrency", "1,4",
                          "--requests", "6", "--prompt-len", "16", "--gen-len", "10", "--settle", "0", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    runs = {row["mode"]: row for row in report["runs"]}
    assert list(runs) == ["sequential", "1 clients", "4 clients"] and report["slots"] == 4
    for row in runs.values():
        assert row["tokens"] == 60 and row["requests"] == 6
        assert 60 / row["tokens_per_s"] == pytest.approx(row["wall_s"], abs=6e-4)  # wall_s has 3 decimals
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / runs["sequential"]["tokens_per_s"], abs=0.01)
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"] and 0 < row["itl_p50_ms"] <= row["itl_p95_ms"]
    assert runs["1 clients"]["occupancy"] == pytest.approx(0.25, abs=0.01)  # one row of 4 slots in every step
    assert 0.25 < runs["4 clients"]["occupancy"] <= 1 and report["peak_rss_mb"] > 50
    for row in runs.values():
        assert row.get("cached_tokens", 0) == 0  # every run draws prompts of its own: nothing to reuse
    shared = subprocess.run([sys.executable, "-m", "llama_export.runtime.load_bench", str(artifact.directory),
                             "--concurrency", "4", "--requests", "4", "--prompt-len", "6", "--gen-len", "4",
                             "--workload", "shared-prefix", "--shared-len", "30", "--prefix-reuse", "both",
                             "--no-sequential", "--settle", "0", "--json"], capture_output=True, text=True, timeout=300)
    assert shared.returncode == 0, shared.stderr
    runs = {row["mode"]: row for row in json.loads(shared.stdout)["runs"]}
    assert list(runs) == ["4 clients, reuse on", "4 clients, reuse off"]
    # the first request prefills the system prompt; the three others copy it from its running row
    assert runs["4 clients, reuse on"]["cached_tokens"] == 3 * 30 and runs["4 clients, reuse off"]["cached_tokens"] == 0
    bad = subprocess.run([sys.executable, "-m", "llama_export.runtime.load_bench", str(artifact.directory), "--concurrency", "0,2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give client counts ≥ 1" in bad.stderr and "Traceback" not in bad.stderr


# ---- prefix reuse: a finished sequence stays in its slot, and a prompt that starts with it prefills only the rest --


@pytest.mark.parametrize("case", ["tiny", "gqa"])
def test_a_suffix_prefilled_against_a_kept_prefix_gives_the_whole_prefills_logits(artifacts, case):
    """The backend alone: a prompt prefilled whole in one row, and in another as a kept prefix cut back (truncate)
    and its suffix. The float sums differ; the logits stay within the fp32 parity threshold, the argmax equal."""
    artifact, backend = artifacts(case)
    prompt = np.random.default_rng(5).integers(3, 4000, 40)[None]
    cache = backend.slot_cache(2)
    whole = backend.step_rows(cache, 0, 1, prompt).copy()
    backend.step_rows(cache, 1, 2, np.concatenate([prompt[:, :25], [[7, 8, 9]]], axis=1))  # a longer, other tail
    backend.truncate_row(cache, 1, 25)
    suffix = backend.step_rows(cache, 1, 2, prompt[:, 25:]).copy()
    delta = float(np.abs(whole - suffix).max())
    print(f"{case}: max |logit whole - prefix+suffix| = {delta:.2e}")
    assert delta <= 2e-3 and whole.argmax() == suffix.argmax()


@pytest.mark.parametrize("case", ["tiny", "gqa"])
def test_a_conversation_reuses_its_slot_and_equals_the_uncached_run(artifacts, tokenizer, case):
    """Three turns, each prompt the previous prompt + its answer + new text: from the second turn on, all but the
    last token of what the slot holds is reused, and the greedy tokens equal the solo run's; cache_prompt=False
    reuses nothing and gives the same tokens."""
    artifact, backend = artifacts(case)
    rng = np.random.default_rng(11)
    prompt = rng.integers(3, 4000, 12).tolist()
    with InflightBatcher(backend, tokenizer, slots=2) as batcher:
        for turn in range(3):
            request = Request(prompt, 8)
            want = solo(backend, tokenizer, request)
            got = batcher.submit(request).result(30)
            uncached = batcher.submit(Request(prompt, 8, cache_prompt=False)).result(30)
            assert got.tokens == want.tokens and uncached.tokens == want.tokens, turn
            assert uncached.cached_tokens == 0
            if turn:
                assert got.cached_tokens == held, (turn, got.cached_tokens, held)
            held = len(prompt) + len(got.tokens) - 1  # the last sampled token was never fed
            prompt = prompt + got.tokens + rng.integers(3, 4000, 6).tolist()
        stats = batcher.stats()
    assert stats["prefix_hit_tokens"] > 0 and stats["prefix_queried_tokens"] > stats["prefix_hit_tokens"]


def test_the_longest_kept_prefix_is_chosen_and_a_failed_prefill_keeps_nothing(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    rng = np.random.default_rng(12)
    a, b, c = (rng.integers(3, 3999, 20).tolist() for _ in range(3))
    poison = 4000
    faulty = FaultyBackend(backend, poison, decode_fault=10 ** 9)
    with InflightBatcher(faulty, tokenizer, slots=3) as batcher:
        for prompt in (a, b, c):  # one after the other: each ends in a slot of its own
            batcher.submit(Request(prompt, 4)).result(30)
        follow = Request(b + [5, 6, 7], 6)
        got = batcher.submit(follow).result(30)
        assert got.cached_tokens == len(b)  # b's row (a's and c's share nothing with it)
        assert got.tokens == solo(backend, tokenizer, follow).tokens
        failed = batcher.submit(Request([poison] + a[1:], 4)).result(30)
        assert failed.finish_reason == "error"
        again = batcher.submit(Request([poison] + a[1:] + [9], 4, params=SamplingParams())).result(30)
        assert again.finish_reason == "error" and again.cached_tokens == 0  # nothing of the failed one was kept


# ---- chunked prefill: a long prompt is prefilled a chunk per step, between decode steps of the running rows -------


class RecordingBackend:
    """The real backend, its steps recorded as (first row, rows, tokens); `on_step` may act after each (the
    computation is real)."""

    def __init__(self, backend, on_step=None):
        self.backend, self.calls, self.on_step = backend, [], on_step

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step_rows(self, cache, start, stop, input_ids):
        self.calls.append((start, stop - start, input_ids.shape[1]))
        if self.on_step is not None:
            self.on_step(self, input_ids)
        return self.backend.step_rows(cache, start, stop, input_ids)


@pytest.mark.parametrize("case", ["tiny", "gqa"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(artifacts, tokenizer, case):
    """With prefill_chunk=16 a 70-token prompt arriving while two requests decode is prefilled in five parts, each
    followed by a decode step of the two running rows; every request equals its solo run."""
    artifact, backend = artifacts(case)
    rng = np.random.default_rng(21)
    short = [Request(rng.integers(3, 4000, 6).tolist(), 30) for _ in range(2)]
    long = Request(rng.integers(3, 4000, 70).tolist(), 8)
    want = [solo(backend, tokenizer, r) for r in (*short, long)]
    recording = RecordingBackend(backend)
    with InflightBatcher(recording, tokenizer, slots=4, prefill_chunk=16) as batcher:
        first = [batcher.submit(r) for r in short]
        for handle in first:
            next(iter(handle))  # both decode
        late = batcher.submit(long)
        got = [h.result(60) for h in (*first, late)]
    assert [g.tokens for g in got] == [w.tokens for w in want]
    parts = [i for i, call in enumerate(recording.calls) if call[0] == 2 and call[2] > 1]  # row 2: the long one
    assert [recording.calls[i][2] for i in parts] == [16, 16, 16, 16, 6], recording.calls
    # the running rows decode after each part but the last (whose first token then joins them)
    assert all(recording.calls[i + 1] == (0, 2, 1) for i in parts[:-1]), recording.calls


def test_a_chunked_prefill_cancelled_or_failing_midway_keeps_nothing(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    prompt = np.random.default_rng(22).integers(3, 4000, 60).tolist()
    holder = {}

    def cancel_after_second_part(recording, input_ids):
        if input_ids.shape[1] == 16 and sum(c[2] == 16 for c in recording.calls) == 2:
            holder["handle"].cancel()

    recording = RecordingBackend(backend, cancel_after_second_part)
    with InflightBatcher(recording, tokenizer, slots=2, prefill_chunk=16) as batcher:
        holder["handle"] = batcher.submit(Request(prompt, 8))
        cancelled = holder["handle"].result(30)
        assert cancelled.finish_reason == "cancelled" and cancelled.tokens == [] and cancelled.ttft_s is None
        again = batcher.submit(Request(prompt, 8)).result(30)
        assert again.cached_tokens == 0, "a half-written prompt was kept"
        assert again.tokens == solo(backend, tokenizer, Request(prompt, 8)).tokens
    faulty = FaultyBackend(backend, poison=prompt[16], decode_fault=10 ** 9)  # the second part starts with it
    with InflightBatcher(faulty, tokenizer, slots=2, prefill_chunk=16) as batcher:
        failed = batcher.submit(Request(prompt, 8)).result(30)
        assert failed.finish_reason == "error" and "injected prefill fault" in failed.error
        retry = batcher.submit(Request(prompt[:16] + [5, 6], 4)).result(30)
        assert retry.cached_tokens == 0, "a failed prefill's first part was kept"


@pytest.mark.parametrize("case", ["tiny", "gqa"])
def test_concurrent_requests_share_a_system_prompt_from_a_running_row(artifacts, tokenizer, case):
    """Four requests that share a 40-token system prompt, submitted at once: the first prefills it, each later one
    copies it from a running row and prefills only its own question; all equal their solo runs."""
    artifact, backend = artifacts(case)
    rng = np.random.default_rng(31)
    system = rng.integers(3, 4000, 40).tolist()
    work = [Request(system + rng.integers(3, 4000, 5).tolist(), 10) for _ in range(4)]
    want = [solo(backend, tokenizer, r) for r in work]
    with InflightBatcher(backend, tokenizer, slots=4) as batcher:
        got = [h.result(60) for h in batcher.submit_many(work)]
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.cached_tokens for g in got] == [0, 40, 40, 40]


def test_prefixes_are_shared_only_within_a_cache_salt(artifacts, tokenizer):
    artifact, backend = artifacts("gqa")
    rng = np.random.default_rng(41)
    prompt = rng.integers(3, 4000, 30).tolist()
    with InflightBatcher(backend, tokenizer, slots=3) as batcher:
        assert batcher.submit(Request(prompt, 4, cache_salt="tenant-a")).result(30).cached_tokens == 0
        other = batcher.submit(Request(prompt + [5], 4, cache_salt="tenant-b")).result(30)
        same = batcher.submit(Request(prompt + [6], 4, cache_salt="tenant-a")).result(30)
        unsalted = batcher.submit(Request(prompt + [7], 4)).result(30)
        assert (other.cached_tokens, same.cached_tokens, unsalted.cached_tokens) == (0, 30, 0)
        # concurrent: a running row of another salt is no source either
        running = [Request(prompt + [9, 9, 9], 20, cache_salt="x"), Request(prompt + [8], 4, cache_salt="y")]
        got = [h.result(30) for h in batcher.submit_many(running)]
        assert got[1].cached_tokens == 0
        assert got[1].tokens == solo(backend, tokenizer, running[1]).tokens
        with pytest.raises(RequestRejected, match="cache_salt must be a string, not int"):
            batcher.submit(Request(prompt, 4, cache_salt=5))
