"""Runtime: greedy tokens equal transformers' generate, sampling statistics, streaming, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions
from llama_export.runtime.artifact import Artifact, ArtifactError
from llama_export.runtime.backends import OrtBackend, StaticOrtBackend, open_backend
from llama_export.runtime.generation import Generation, GenerationError, generate
from llama_export.runtime.hugepages import huge_pages_state
from llama_export.runtime.sampling import SamplingParams, filtered_probs, sample

from conftest import PROMPTS, RUNTIME_CONFIGS as CONFIGS, hf_greedy

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    made = {}

    def get(case, flavour="portable"):
        """flavour: portable (the traced graph), ort (fused for ONNX Runtime), static (fused, TensorScatter cache),
        ort-static (fused for ONNX Runtime: GroupQueryAttention on one shared past/present buffer)."""
        if (case, flavour) not in made:
            ckpt = resolve_checkpoint("tiny") if case == "tiny" else RandomCheckpoint(CONFIGS[case], seed=9)
            out = tmp_path_factory.mktemp(f"{case}-{flavour}") / "artifact"
            options = {"portable": ExportOptions(optimize=False), "ort": ExportOptions(target="ort"),
                       "static": ExportOptions(kv_cache="static", max_seq_len=96),
                       "ort-static": ExportOptions(target="ort", kv_cache="static", max_seq_len=96)}[flavour]
            build_artifact(ckpt, out, options, tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
            made[case, flavour] = (Artifact.open(out), ckpt)
        return made[case, flavour]
    return get


@pytest.mark.parametrize("case, flavour", [("mha", "portable"), ("gqa", "portable"), ("tiny", "portable"),
                                           ("mha", "ort"), ("gqa", "ort"), ("mha", "static"), ("gqa", "static"),
                                           ("mha", "ort-static"), ("gqa", "ort-static")])
def test_greedy_tokens_equal_transformers_single_and_batched(artifacts, tokenizer, case, flavour):
    artifact, ckpt = artifacts(case, flavour)
    backend = open_backend(artifact)
    assert type(backend) is (StaticOrtBackend if flavour.endswith("static") else OrtBackend)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(ckpt, prompts, 32)
    batched = generate(backend, tokenizer, prompts, artifact.max_length, 32)
    assert [r.tokens for r in batched] == expected
    for prompt, want in zip(prompts, expected):
        assert generate(backend, tokenizer, [prompt], artifact.max_length, 32)[0].tokens == want
    assert all(len(r.tokens) == 32 or r.finish_reason == "stop" for r in batched)


@pytest.mark.parametrize("case, flavour", [("gqa", "portable"), ("mha", "ort-static")])
def test_torch_backend_tokens_equal_transformers(artifacts, tokenizer, case, flavour):
    """The reference model on the artifact's own weights (packed ones split back), batched and alone."""
    artifact, ckpt = artifacts(case, flavour)
    backend = open_backend(artifact, "torch")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(ckpt, prompts, 32)
    assert [r.tokens for r in generate(backend, tokenizer, prompts, artifact.max_length, 32)] == expected
    assert generate(backend, tokenizer, [prompts[1]], artifact.max_length, 32)[0].tokens == expected[1]


def test_torch_backend_refuses_int8_weights(tmp_path):
    out = tmp_path / "int8"
    build_artifact(RandomCheckpoint(CONFIGS["gqa"], seed=9), out, ExportOptions(quantization="int8"),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    with pytest.raises(ValueError, match="the torch backend runs float weights; .* is INT8 .*use the ort backend"):
        open_backend(Artifact.open(out), "torch")


def test_static_cache_window_is_its_slots(artifacts, tokenizer):
    artifact, _ = artifacts("gqa", "static")
    assert artifact.flavour == "static" and artifact.max_length == artifact.max_sequence_length == 96
    backend = open_backend(artifact)
    with pytest.raises(GenerationError, match="exceeds the context window of 96; lower max_new_tokens to 6"):
        Generation(backend, tokenizer, [list(range(5, 95))], artifact.max_length, 10)
    ids = np.full((1, 97), 5)
    with pytest.raises(ValueError, match="97 tokens do not fit the static cache of 96 slots; re-export with a "
                                         "larger --max-seq-len"):
        backend.forward(ids, np.ones_like(ids), np.arange(97)[None], backend.empty_cache(1), 1)


def test_same_seed_same_tokens_and_seed_matters(artifacts, tokenizer):
    artifact, _ = artifacts("tiny")
    backend = OrtBackend(artifact)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    run = lambda seed: [r.tokens for r in generate(backend, tokenizer, prompts, artifact.max_length, 24,
                                                   SamplingParams(temperature=1.0, top_p=0.95, seed=seed))]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_never_leaves_the_k_best():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 100)) * 3
    params = SamplingParams(temperature=1.5, top_k=5, seed=0)
    best = np.argsort(-logits, -1)[:, :5]
    for _ in range(50):
        tokens = sample(logits, params, rng)
        assert all(t in row for t, row in zip(tokens, best))


def test_top_p_matches_the_truncated_distribution():
    """Chi-square of 20000 draws against softmax truncated to the top-p nucleus (fixed seed)."""
    logits = np.log(np.array([[0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.04, 0.03]]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    probs = filtered_probs(logits, params)[0]
    assert np.count_nonzero(probs) == 4  # 0.68 < 0.75 keeps a fourth token; 0.80 >= 0.75 stops there
    rng = np.random.default_rng(1234)
    draws = sample(np.repeat(logits, 20000, axis=0), params, rng)
    counts = np.bincount(draws, minlength=8)
    assert counts[4:].sum() == 0
    expected = probs[:4] * 20000
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum()
    assert chi2 < 16.27  # chi-square 0.999 quantile, 3 degrees of freedom


def test_min_p_and_repetition_penalty():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))[0]
    assert np.count_nonzero(kept) == 3  # 0.05 < 0.2 * 0.5
    penalised = sample(np.array([[2.0, 1.9, -1.0]]), SamplingParams(repetition_penalty=1.5), None, [[0]])
    assert penalised.tolist() == [1]  # 2.0 / 1.5 < 1.9


def test_streaming_concatenates_to_the_full_text(artifacts, tokenizer):
    artifact, _ = artifacts("tiny")
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode("emoji \U0001F9EC and 日本")]
    run = Generation(OrtBackend(artifact), tokenizer, prompts, artifact.max_length, 40,
                     SamplingParams(temperature=1.0, seed=5))
    pieces = [[] for _ in prompts]
    for deltas in run:
        for row, delta in enumerate(deltas):
            assert "\ufffd" not in delta
            pieces[row].append(delta)
    for prompt, row, result in zip(prompts, pieces, run.results):
        assert "".join(row) == result.text
        full = tokenizer.decode(prompt + result.tokens)
        assert full == tokenizer.decode(prompt) + result.text


def test_stop_strings_and_ids(artifacts, tokenizer):
    artifact, _ = artifacts("tiny")
    backend = OrtBackend(artifact)
    prompt = [tokenizer.encode("A list comprehension")]
    free = generate(backend, tokenizer, prompt, artifact.max_length, 30)[0]
    stop = free.text.strip()[:6]
    cut = generate(backend, tokenizer, prompt, artifact.max_length, 30, stop_strings=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    by_id = generate(backend, tokenizer, prompt, artifact.max_length, 30, stop_token_ids=[free.tokens[3]])[0]
    assert by_id.tokens == free.tokens[:free.tokens.index(free.tokens[3])] and by_id.finish_reason == "stop"


def test_generation_errors(artifacts, tokenizer):
    artifact, _ = artifacts("mha")
    backend = OrtBackend(artifact)
    with pytest.raises(GenerationError, match="a prompt is empty"):
        Generation(backend, tokenizer, [[]], artifact.max_length, 4)
    with pytest.raises(GenerationError, match="a prompt has 128 tokens; the context window is 128"):
        Generation(backend, tokenizer, [[5] * 128], artifact.max_length, 4)
    with pytest.raises(GenerationError, match=r"exceeds the context window of 128; lower max_new_tokens to 28"):
        Generation(backend, tokenizer, [[5] * 100], artifact.max_length, 40)
    with pytest.raises(GenerationError, match="a stop string is empty"):
        Generation(backend, tokenizer, [[5]], artifact.max_length, 4, stop_strings=["</s>", ""])
    for bad, message in ((dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
                         (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
                         (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
                         (dict(top_k=-2), "top_k=-2 must be >= 0"),
                         (dict(temperature=float("inf")), "temperature=inf must be >= 0 and finite"),
                         (dict(seed=-1), "seed=-1 must be >= 0")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["llama_export.runtime.cli", "llama_export.runtime.chat_cli", "llama_export.runtime.bench"])
def test_commands_help_names_their_environment(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("LLAMA_EXPORT_HUGEPAGES=0", "LLAMA_EXPORT_VERIFY=always", "LLAMA_EXPORT_CACHE=DIR"):
        assert name in out.stdout, (module, out.stdout)


def test_cli_json_batch_equals_api(artifacts, tokenizer):
    artifact, _ = artifacts("tiny")
    out = cli(str(artifact.directory), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--json",
              "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = generate(OrtBackend(artifact), tokenizer, [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[2])],
                        artifact.max_length, 12)
    assert [r["tokens"] for r in rows] == [e.tokens for e in expected]
    assert [r["text"] for r in rows] == [e.text for e in expected]
    reference = cli(str(artifact.directory), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--json",
                    "--max-new-tokens", "12", "--backend", "torch")
    assert reference.returncode == 0, reference.stderr
    assert [json.loads(line) for line in reference.stdout.splitlines()] == rows


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "a prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--prompt", "x", "--seed", "-1"], "seed=-1 must be >= 0"),
    (["--prompt", "x", "--stop", ""], "a stop string is empty"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the context window of 1024"),
    (["--prompt", "word " * 1100], "the context window is 1024"),
])
def test_cli_bad_input(artifacts, args, message):
    artifact, _ = artifacts("tiny")
    out = cli(str(artifact.directory), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["--seed", "-1"], "seed=-1 must be >= 0"),
    (["--temperature", "inf"], "temperature=inf must be >= 0 and finite"),
])
def test_chat_bad_input(artifacts, args, message):
    artifact, _ = artifacts("tiny")
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.chat_cli", str(artifact.directory), *args], input="Hello\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_tampered_artifact_is_refused(artifacts, tmp_path):
    import shutil

    artifact, _ = artifacts("mha")
    copy = tmp_path / "copy"
    shutil.copytree(artifact.directory, copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match=r"model.onnx.data: sha256 does not match the manifest"):
        Artifact.open(copy)
    out = cli(str(copy), "--prompt", "x")
    assert out.returncode == 2 and "sha256 does not match" in out.stderr
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json; not an artifact directory"):
        Artifact.open(copy)
    with pytest.raises(ArtifactError, match="missing does not exist: give an artifact directory"):
        Artifact.open(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="model.onnx is a file: give an artifact directory"):
        Artifact.open(copy / "model.onnx")


def test_verified_files_are_hashed_again_only_when_they_change(artifacts, tmp_path, monkeypatch):
    """A file whose sha256 matched is not hashed again while its stat fingerprint holds. A write, even one that puts
    the mtime back, makes the next open hash it (and refuse it); LLAMA_EXPORT_VERIFY=always hashes every file every
    time; a cache that cannot be written only costs the hashing."""
    import shutil

    import llama_export.runtime.artifact as artifact_module

    artifact, _ = artifacts("mha")
    copy = tmp_path / "copy"
    shutil.copytree(artifact.directory, copy)
    files = set(artifact.manifest.files)
    hashed = []
    real_sha256 = artifact_module.sha256
    monkeypatch.setattr(artifact_module, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    monkeypatch.setenv("LLAMA_EXPORT_CACHE", str(tmp_path / "cache"))

    def flip(offset=5000):
        data = copy / "model.onnx.data"
        before = data.stat()
        with open(data, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # the mtime put back

    Artifact.open(copy)
    assert set(hashed) == files and len(hashed) == len(files)
    hashed.clear()
    Artifact.open(copy)
    assert hashed == []
    flip()
    with pytest.raises(ArtifactError, match=r"model.onnx.data: sha256 does not match the manifest"):
        Artifact.open(copy)
    assert hashed == ["model.onnx.data"]
    flip()  # the original bytes again: hashed once more, then known
    hashed.clear()
    Artifact.open(copy)
    Artifact.open(copy)
    assert hashed == ["model.onnx.data"]
    hashed.clear()
    monkeypatch.setenv("LLAMA_EXPORT_VERIFY", "always")
    Artifact.open(copy)
    assert sorted(hashed) == sorted(files)
    monkeypatch.delenv("LLAMA_EXPORT_VERIFY")
    hashed.clear()
    monkeypatch.setenv("LLAMA_EXPORT_CACHE", str(copy / "manifest.json" / "cache"))  # under a file: not writable
    Artifact.open(copy)
    Artifact.open(copy)
    assert sorted(hashed) == sorted(list(files) * 2)


def test_chat_keeps_history_and_reports_a_full_window(artifacts, tokenizer):
    from llama_export.runtime.chat import chat_prompt_ids

    artifact, _ = artifacts("tiny")
    backend = OrtBackend(artifact)
    window = artifact.max_length
    stdin = "What is a list?\nAnd a tuple?\n" + "word " * 1100 + "\n"
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.chat_cli", str(artifact.directory), "--system", "Be brief.",
                          "--max-new-tokens", "12"], input=stdin, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr  # without a terminal, the refused last message makes the status 2
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    first = generate(backend, tokenizer, [chat_prompt_ids(tokenizer, dialog)], window, 12)[0]
    dialog += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a tuple?"}]
    second = generate(backend, tokenizer, [chat_prompt_ids(tokenizer, dialog)], window, 12)[0]
    assert out.stdout.splitlines()[:len((first.text + "\n" + second.text).splitlines())] == \
        (first.text + "\n" + second.text).splitlines()
    assert f"the context window is {window}" in out.stderr


def test_chat_on_a_static_artifact_prefills_only_each_new_turn(artifacts, tokenizer):
    """On a static-cache artifact llama-chat keeps the conversation in one slot: the second turn reuses at least
    the whole first prompt, the third at least the second's, and every answer equals the solo run of its dialog."""
    from llama_export.runtime.chat import chat_prompt_ids

    artifact, _ = artifacts("tiny", "ort-static")
    backend = StaticOrtBackend(artifact)
    questions = ["What is a list?", "And a tuple?", "Thanks."]
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.chat_cli", str(artifact.directory),
                          "--max-new-tokens", "8", "--show-stats"], input="\n".join(questions) + "\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = [tuple(map(int, m)) for m in re.findall(r"\((\d+) prompt tokens, (\d+) reused; (\d+) new tokens\)",
                                                    out.stderr)]
    dialog, answers, lengths = [], [], []
    for question in questions:
        dialog.append({"role": "user", "content": question})
        ids = chat_prompt_ids(tokenizer, dialog)
        answer = generate(backend, tokenizer, [ids], artifact.max_length, 8)[0]
        answers.append(answer.text)
        lengths.append(len(ids))
        dialog.append({"role": "assistant", "content": answer.text})
    assert [s[0] for s in stats] == lengths and stats[0][1] == 0
    assert stats[1][1] >= lengths[0] and stats[2][1] >= lengths[1], stats
    assert out.stdout.splitlines() == "\n".join(answers).splitlines()


def test_bench_reports_consistent_figures(artifacts):
    artifact, _ = artifacts("tiny")
    out = subprocess.run([sys.executable, "-m", "llama_export.runtime.bench", str(artifact.directory), "--prompt-len", "16",
                          "--gen-len", "8", "--runs", "1", "--batch", "2", "--settle", "0.5", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["settle_s"] == 0.5
    c = artifact.config
    weights = artifact.manifest.export.weights_bytes - c["vocab_size"] * c["hidden_size"] * 4
    cache = 2 * 4 * 4 * 32 * 4 * (16 + 4.5) * 2
    assert report["bytes_per_step"] == int(weights + cache)
    assert report["decode_tokens_per_s"] == pytest.approx(2 * report["decode_steps_per_s"], rel=0.01)
    assert report["achieved_gb_per_s"] == pytest.approx(
        report["bytes_per_step"] * report["decode_steps_per_s"] / 1e9, rel=0.02)
    assert report["measured_read_gb_per_s"] > 0.5 and report["peak_rss_mb"] > 50
    assert report["check_s"] >= 0 and report["load_s"] > 0
    pages = huge_pages_state()  # llama-bench restarts onto huge pages where this process could ask for them
    assert report["huge_pages"] == (pages.on or pages.can_request), report["huge_pages_why"]
    if report["huge_pages"]:  # the prepacked output projection (4 MiB) at least
        assert report["anon_huge_pages_mb"] >= 2
    assert report["peak_read_gb_per_s"] >= report["measured_read_gb_per_s"]
    assert report["bandwidth_fraction_of_peak"] == pytest.approx(
        report["achieved_gb_per_s"] / report["peak_read_gb_per_s"], rel=0.02)
    # the fraction is the median step's bandwidth against the probe's median run
    assert report["bandwidth_fraction"] == pytest.approx(report["bytes_per_step"] / report["decode_median_step_ms"]
                                                         / 1e6 / report["measured_read_gb_per_s"], rel=0.05)
    # the 1×1 Conv kernel's read rate with the batch's 2 rows against one row, and the fraction against that
    assert 0.2 < report["kernel_read_ratio"] < 5
    assert report["fraction_of_kernel_ceiling"] == pytest.approx(
        report["bandwidth_fraction"] / report["kernel_read_ratio"], rel=0.01)
    bad = subprocess.run([sys.executable, "-m", "llama_export.runtime.bench", str(artifact.directory), "--prompt-len", "1000",
                          "--gen-len", "100"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "exceeds the context window 1024" in bad.stderr


@pytest.mark.parametrize("flavour", ["portable", "static", "ort-static"])
def test_finished_rows_leave_the_batch(artifacts, tokenizer, flavour):
    """A row that stops early is dropped from the batch; the others' tokens equal their runs alone. A static cache
    batches through the in-flight batcher: each prompt prefilled alone, then decode steps over the running rows."""
    artifact, _ = artifacts("gqa", flavour)
    backend = open_backend(artifact)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    stop = generate(backend, tokenizer, [prompts[0]], artifact.max_length, 24)[0].tokens[3]
    alone = [generate(backend, tokenizer, [p], artifact.max_length, 24, stop_token_ids=[stop])[0] for p in prompts]
    assert len({len(r.tokens) for r in alone}) > 1  # rows finish at different steps
    batches = []

    class Recording:
        """The real backend; writes down the batch size of each forward pass."""
        def __getattr__(self, name):
            return getattr(backend, name)

        def forward(self, input_ids, *rest):
            batches.append(input_ids.shape[0])
            return backend.forward(input_ids, *rest)

        def step_rows(self, cache, start, stop, input_ids):
            batches.append(input_ids.shape[0])
            return backend.step_rows(cache, start, stop, input_ids)

    together = generate(Recording(), tokenizer, prompts, artifact.max_length, 24, stop_token_ids=[stop])
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    running = [sum(len(r.tokens) + (r.finish_reason == "stop") > step for r in alone) for step in range(1, 24)]
    prefill = [3] if flavour == "portable" else [1, 1, 1]
    assert batches == prefill + [n for n in running if n > 0] and min(batches) < 3
