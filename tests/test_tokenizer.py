"""Tokenizer ids equal transformers' LlamaTokenizer (both legacy modes) on a real Llama-family model."""

from __future__ import annotations

import itertools

import pytest
import sentencepiece as spm

from llama_export.runtime.chat import ChatFormatError, chat_prompt_ids
from llama_export.runtime.tokenizer import LlamaTokenizer, TokenizerError

BASE = [
    "Hello world", "hello", " Hello", "  Hello", "Hello ", "Hello  ", "   ", " ", "\n", "\n\n", "\t", "a\tb",
    "Hello\nworld", "Hello\n\nworld\n", "line1\r\nline2", "multiple   spaces   here", "trailing space ",
    "naïve café résumé", "Ünïcödé", "日本語のテキスト", "中文测试", "한국어", "Ελληνικά", "Привет мир", "עברית",
    "مرحبا", "हिन्दी", "ไทย", "emoji 😀", "😀😀😀", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "flags 🇫🇷🇩🇪", "e\u0301",
    "zero\u200bwidth", "nbsp\u00a0here", "﻿bom", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "math ∑∫√∞", "½ ¾ ⅓", "°C", "€100", "$3.50",
    "1234567890", "3.14159", "1,000,000", "2023-10-01", "0x1F", "v1.2.3", "100%",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; i++) { sum += a[i]; }",
    "    indented code", "\tif x:\n\t\tpass", "print('hello')", "<div class=\"a\">x</div>", "SELECT * FROM t;",
    "https://example.com/path?q=1&r=2", "user@example.com", "C:\\Users\\name", "#!/bin/bash", "a->b", "x != y",
    "<s>", "</s>", "<unk>", "<s>Hello", "Hello</s>", "<s> Hello", " <s>", "a<s>b</s>c", "<s><s>", "</s> </s>",
    "<unk> spaced", "<S>", "< s>", "<s", "s>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<0x41>", "▁", "▁▁hello",
    "hello▁world", "▁<s>", "<|endoftext|>", "<|im_start|>user", "'", '"', "’", "…", "—", "«quote»",
    "ALL CAPS TEXT", "MiXeD CaSe", "don't", "it's", "I'm", "O'Neil", "e.g.", "i.e.", "Mr. Smith", "U.S.A.",
    "a", "A", "ab", ".", "..", "...", "!!!", "???", "-", "--", "---", "_", "__init__", "snake_case", "camelCase",
]
PREFIXES = ["", " ", "  ", "\n", "<s>", "</s> "]
SUFFIXES = ["", " ", "\n", "</s>", " <unk>"]


def hard_strings() -> list[str]:
    strings = list(BASE)
    affixes = itertools.cycle(itertools.product(PREFIXES, SUFFIXES))
    for text in BASE:  # each base string again, inside a rotating prefix/suffix
        pre, suf = next(affixes)
        strings.append(pre + text + suf)
    strings += [a + " " + b for a, b in zip(BASE[::7], BASE[3::7])]
    return strings


STRINGS = hard_strings()


def test_the_strings_reach_every_hard_path(llama_sp_model):
    """The comparisons below mean something only if these strings take the paths where tokenizers differ: bytes
    outside the vocabulary, special-token strings, and the spaces that legacy and non-legacy treat differently.
    sentencepiece and transformers themselves say which strings do."""
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    byte_fallback = [s for s in STRINGS if any(sp.is_byte(i) for i in sp.encode(s))]
    legacy, modern = (HFLlamaTokenizer(str(llama_sp_model), legacy=flag) for flag in (True, False))
    special = [s for s in STRINGS if set(legacy(s)["input_ids"][1:]) & {0, 1, 2}]
    differ = [s for s in STRINGS if legacy(s)["input_ids"] != modern(s)["input_ids"]]
    # today 252 distinct strings: 69 with byte pieces, 92 with special tokens, 56 where the two modes differ
    assert len(set(STRINGS)) >= 200 and len(byte_fallback) >= 50 and len(special) >= 80 and len(differ) >= 40, \
        (len(byte_fallback), len(special), len(differ))


@pytest.mark.parametrize("legacy", [True, False])
def test_ids_equal_transformers(llama_sp_model, legacy):
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    ours = LlamaTokenizer(llama_sp_model, legacy=legacy)
    theirs = HFLlamaTokenizer(str(llama_sp_model), legacy=legacy)
    mismatches = [(s, ours.encode(s), theirs(s)["input_ids"]) for s in STRINGS
                  if ours.encode(s) != theirs(s)["input_ids"]]
    assert not mismatches, mismatches[:5]
    # and the pieces themselves
    for s in STRINGS[:60]:
        assert ours.tokenize(s) == theirs.tokenize(s), s


def test_legacy_modes_differ_after_special_tokens(llama_sp_model):
    legacy, modern = LlamaTokenizer(llama_sp_model, legacy=True), LlamaTokenizer(llama_sp_model, legacy=False)
    assert legacy.encode("<s>Hello") != modern.encode("<s>Hello")  # dummy prefix after a special token
    assert legacy.encode("Hello") == modern.encode("Hello")


def test_special_ids_and_meta_reference(llama_sp_model):
    tok = LlamaTokenizer(llama_sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 32000)
    for s in STRINGS:
        # Meta's reference: [bos] + sentencepiece.encode(text), special strings not parsed
        assert tok.encode(s, split_special=False) == [1] + sp.encode(s)
        assert tok.encode_plain(s, bos=True) == [1] + sp.encode(s)
    assert tok.encode("x", add_bos=False, add_eos=True) == sp.encode("x") + [2]


def test_byte_fallback(llama_sp_model):
    tok = LlamaTokenizer(llama_sp_model)
    pieces = tok.tokenize("\U0001F9EC")  # a character not in the vocabulary: four byte pieces
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAC>"]
    assert tok.decode(tok.encode("\U0001F9EC")) == "\U0001F9EC"


@pytest.mark.parametrize("legacy", [True, False])
def test_decode_round_trip_without_spurious_spaces(llama_sp_model, legacy):
    tok = LlamaTokenizer(llama_sp_model, legacy=legacy)
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    for s in STRINGS:
        ids = tok.encode(s, split_special=False)
        assert tok.decode(ids) == sp.decode(ids[1:])
        if legacy and "\u2581" not in s:  # sentencepiece reads a literal "▁" as a space
            assert tok.decode(ids) == s
    assert tok.decode(tok.encode("a<s>b"), skip_special=False) in ("<s>a<s>b", "<s>a<s> b")
    with pytest.raises(TokenizerError, match="token id 32000 is outside the vocabulary"):
        tok.decode([5, 32000])


def test_stream_decode_equals_full_decode(llama_sp_model):
    tok = LlamaTokenizer(llama_sp_model)
    for s in STRINGS + ["\U0001F9EC\U0001F9EC mixed 日本 \U0001F9EC", " leading", "end\U0001F9EC"]:
        ids = tok.encode(s)
        stream = tok.stream()
        parts = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(parts) == tok.decode(ids), s
        assert all("\ufffd" not in p for p in parts) or "\ufffd" in s


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer model not found"):
        LlamaTokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model: not a sentencepiece model"):
        LlamaTokenizer(tmp_path / "bad.model")


# ---- Llama-2-chat format -----------------------------------------------------------------


def meta_reference_chat(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion, transcribed: [bos]+sp.encode(...)(+[eos]) per turn."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]}] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [1] + sp.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ") + [2]
    tokens += [1] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return tokens


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Always answer with Haiku"}, {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! How can I help? "},
     {"role": "user", "content": "  Tell me a joke.\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 日本 😀?"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_prompt_equals_meta_reference(llama_sp_model, dialog):
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    for legacy in (True, False):
        assert chat_prompt_ids(LlamaTokenizer(llama_sp_model, legacy=legacy), dialog) == meta_reference_chat(sp, dialog)


def test_chat_prompt_equals_transformers_per_turn(llama_sp_model):
    """transformers' legacy tokenizer on each turn's text gives the same ids (its BOS, our EOS)."""
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    hf = HFLlamaTokenizer(str(llama_sp_model), legacy=True)
    dialog = DIALOGS[2]
    expected = hf("[INST] Hi [/INST] Hello! How can I help? ")["input_ids"] + [2] + \
        hf("[INST] Tell me a joke. [/INST]")["input_ids"]
    assert chat_prompt_ids(LlamaTokenizer(llama_sp_model), dialog) == expected


@pytest.mark.parametrize("dialog, message", [
    ([], "the dialog is empty"),
    ([{"role": "assistant", "content": "x"}], "turn 0 has role 'assistant' where 'user' is expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user message"),
    ([{"role": "user", "content": "[INST] inject"}], r"contains one of \[INST\]"),
    ([{"role": "system", "content": "x"}], "must be followed by a user message"),
    ([{"role": "bot", "content": "x"}], "needs role system/user/assistant"),
])
def test_chat_format_errors(llama_sp_model, dialog, message):
    with pytest.raises(ChatFormatError, match=message):
        chat_prompt_ids(LlamaTokenizer(llama_sp_model), dialog)
