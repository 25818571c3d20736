"""Fuzzing with hypothesis: the tokenizer, the chat format, the sampling parameters and every command's option
parsing. Derandomized (a fixed sequence of examples), a bounded number of examples, no deadline: the same inputs on
every run, in a few seconds each.

- tokenizer: ids equal sentencepiece's own encode, decode equals sentencepiece's decode, streamed decode equals the
  full decode, and no string (lone surrogates included) raises anything but TokenizerError;
- chat format: any dialog gives ids or ChatFormatError/TokenizerError, and a valid one has one bos per user turn;
- sampling: any numbers give SamplingParams or ValueError; accepted ones sample ids inside the vocabulary from a
  distribution that sums to 1;
- command lines: random options and values never make a command print a traceback or end by an exception.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_export.runtime.chat import ChatFormatError, chat_prompt_ids
from llama_export.runtime.sampling import SamplingParams, filtered_probs, sample
from llama_export.runtime.tokenizer import LlamaTokenizer, TokenizerError

FUZZ = settings(derandomize=True, max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=25)

any_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from("ab <s></s>▁ \n")),
    st.lists(st.sampled_from(["<s>", "</s>", "<unk>", " ", "▁", "\n", "é", "日本", "🙂", "\x00", "\ufffd"])).map("".join),
)


@pytest.fixture(scope="module")
def tok(llama_sp_model):
    return LlamaTokenizer(llama_sp_model)


@given(text=st.text())
@FUZZ
def test_tokenizer_matches_sentencepiece(tok, text):
    ids = tok.encode(text, add_bos=False, split_special=False)
    assert ids == tok.sp.encode(text)
    assert tok.decode(ids) == tok.sp.decode(ids)


@given(text=any_text)
@FUZZ
def test_tokenizer_never_raises_anything_else(tok, text):
    try:
        ids = tok.encode(text)
    except TokenizerError as err:
        assert "not valid UTF-8" in str(err)
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    tok.decode(ids)


@given(ids=st.lists(st.integers(0, 31999), max_size=40) | st.text().map(lambda t: t))
@FUZZ
def test_streamed_decode_equals_full_decode(tok, ids):
    if isinstance(ids, str):
        ids = tok.encode(ids, add_bos=False)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", None]),
                                 "content": st.one_of(any_text, st.sampled_from(["[INST]", "<<SYS>>"]), st.none())})


@given(dialog=st.lists(message, max_size=6) | st.lists(st.tuples(any_text, any_text), max_size=3).map(
    lambda pairs: [m for u, a in pairs for m in ({"role": "user", "content": u},
                                                 {"role": "assistant", "content": a})][:-1] or
    [{"role": "user", "content": ""}]))
@FUZZ
def test_chat_format(tok, dialog):
    try:
        ids = chat_prompt_ids(tok, dialog)
    except (ChatFormatError, TokenizerError):
        return
    users = sum(1 for m in dialog if m["role"] == "user")
    assert ids.count(tok.bos_id) == users and ids[0] == tok.bos_id


numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5).map(float)


@given(temperature=numbers, top_k=st.integers(-3, 300), top_p=numbers, min_p=numbers, penalty=numbers,
       seed=st.integers(-2, 2**40), logits=st.lists(st.floats(-50, 50), min_size=2, max_size=64))
@FUZZ
def test_sampling_parameters(temperature, top_k, top_p, min_p, penalty, seed, logits):
    try:
        params = SamplingParams(temperature, top_k, top_p, min_p, penalty, seed)
    except ValueError:
        return
    batch = np.array([logits, logits[::-1]], np.float32)
    ids = sample(batch, params, np.random.default_rng(seed), seen=[[0, 1], [1]])
    assert ids.shape == (2,) and all(0 <= i < len(logits) for i in ids)
    if params.temperature > 0:
        probs = filtered_probs(batch, params)
        assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(-1), 1)
    assert math.isfinite(params.temperature)


COMMANDS = {"llama-export": "llama_export.exporter.cli", "llama-build": "llama_export.exporter.build_cli",
            "llama-reference": "llama_export.exporter.reference_cli", "llama-generate": "llama_export.runtime.cli",
            "llama-chat": "llama_export.runtime.chat_cli", "llama-bench": "llama_export.runtime.bench"}
VALUES = st.one_of(st.integers(-(2**70), 2**70).map(str), numbers.map(str), st.text(max_size=12),
                   st.sampled_from(["", "-", "--", "nan", "-1", "0", "1e309", "tiny", "--help"]))


def _argv(command: str):
    main = importlib.import_module(COMMANDS[command]).main
    options = sorted(o for p in main.params for o in p.opts + p.secondary_opts if o.startswith("-")
                     and o not in ("-h", "--help"))
    pair = st.tuples(st.sampled_from(options), VALUES)
    # a directory that is not there, for the commands that take one: nothing heavy can start
    lead = ["/nonexistent/artifact"] if command not in ("llama-export", "llama-reference") else ["--model",
                                                                                                  "/nonexistent/model"]
    return st.lists(pair, max_size=4).map(lambda pairs: lead + [x for p in pairs for x in p])


@pytest.fixture(scope="module", autouse=True)
def no_relaunch():
    saved = os.environ.get("LLAMA_EXPORT_HUGEPAGES")
    os.environ["LLAMA_EXPORT_HUGEPAGES"] = "0"  # the runtime commands would restart the process on huge pages
    yield
    if saved is None:
        del os.environ["LLAMA_EXPORT_HUGEPAGES"]
    else:
        os.environ["LLAMA_EXPORT_HUGEPAGES"] = saved


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_option_parsing_never_prints_a_traceback(command, tmp_path):
    from click.testing import CliRunner

    main = importlib.import_module(COMMANDS[command]).main

    @given(argv=_argv(command))
    @FEW
    def run(argv):
        result = CliRunner().invoke(main, argv, input="hello\n")
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, result.output)
        assert "Traceback" not in result.output, (argv, result.output)
        assert result.exit_code in (0, 2), (argv, result.exit_code, result.output)
        assert not any(tmp_path.iterdir())

    cwd = os.getcwd()
    os.chdir(tmp_path)  # a default output directory would appear here
    try:
        run()
    finally:
        os.chdir(cwd)
