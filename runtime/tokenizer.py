"""The Llama sentencepiece tokenizer, with the ids of transformers' `LlamaTokenizer`.

`legacy=True` (what Llama 2's tokenizer_config says, and Meta's `[bos] + sp.encode(text)`) lets
sentencepiece add its dummy-prefix space to every piece of text, including the text that follows
a special token. `legacy=False` adds that space only at the very start of the input. Special token
strings in the text (`<s>`, `</s>`, `<unk>`) become their ids unless `split_special=False`.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"


class TokenizerError(ValueError):
    pass


class LlamaTokenizer:
    def __init__(self, model_file: str | Path, legacy: bool = True, add_bos: bool = True, add_eos: bool = False):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise TokenizerError(f"{self.model_file}: tokenizer model not found")
        try:
            data = self.model_file.read_bytes()
        except OSError as err:
            raise TokenizerError(f"{self.model_file}: cannot read it ({err.strerror})") from None
        self.legacy, self.add_bos, self.add_eos = legacy, add_bos, add_eos
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data if legacy else _without_dummy_prefix(data))
        except (RuntimeError, OSError, ValueError) as err:
            raise TokenizerError(
                f"{self.model_file}: not a sentencepiece model ({err}); use the tokenizer.model of the checkpoint"
            ) from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id()
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self.special_tokens = {self.sp.id_to_piece(i): i for i in self.special_ids}
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_split = re.compile(f"({pattern})")
        # Meta's encode, and every decode, use the model as shipped (with its dummy prefix), whose
        # decode drops the first piece's leading space: the space the encoder added.
        self.plain_sp = self.sp if legacy else spm.SentencePieceProcessor(model_proto=data)
        self._unk_len = len(self.sp.encode(self.sp.id_to_piece(self.unk_id), out_type=str))
        # no piece covers more characters than this: a text of n characters has at least n / longest_piece tokens
        self.longest_piece = max(len(self.sp.id_to_piece(i)) for i in range(self.vocab_size))

    # ---- encoding ------------------------------------------------------------------------

    def _encode_segment(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        # Without the dummy prefix sentencepiece drops a leading "▁"; keep it by encoding behind <unk>.
        pieces = self.sp.encode(self.sp.id_to_piece(self.unk_id) + text, out_type=str)
        return pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces

    def tokenize(self, text: str, split_special: bool = True) -> list[str]:
        """Pieces, as transformers' `LlamaTokenizer.tokenize` returns them."""
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        segments = self._special_split.split(text) if split_special else [text]
        pieces: list[str] = []
        for segment in segments:
            if not segment:
                continue
            pieces.extend([segment] if split_special and segment in self.special_tokens else self._encode_segment(segment))
        if not self.legacy and len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special_tokens:
            pieces = pieces[1:]
        return pieces

    def encode_plain(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Meta's reference encode: `[bos] + sentencepiece.encode(text) + [eos]`, no special-token parsing."""
        _check_unicode(text)
        return ([self.bos_id] if bos else []) + self.plain_sp.encode(text) + ([self.eos_id] if eos else [])

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               split_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"expected text (str), got {type(text).__name__}")
        _check_unicode(text)
        ids = [self.special_tokens.get(p) if split_special and p in self.special_tokens else self.sp.piece_to_id(p)
               for p in self.tokenize(text, split_special)]
        bos = self.add_bos if add_bos is None else add_bos
        eos = self.add_eos if add_eos is None else add_eos
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    # ---- decoding ------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`, as sentencepiece decodes them (no space added around pieces)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special:
            return self.plain_sp.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self.plain_sp.decode(run) + self.plain_sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.plain_sp.decode(run)

    def encode_within(self, text: str, window: int, what: str = "the prompt") -> list[int]:
        """`encode(text)`, refusing at once (before tokenizing) a text too long to fit `window` tokens whatever
        its pieces: so 10 MB of text is a quick error, not minutes of tokenizing and gigabytes of ids."""
        if len(text) > 4 * window * self.longest_piece:  # 4: room for normalization that joins characters
            raise TokenizerError(f"{what} has {len(text)} characters, far more than the context window of {window} "
                                 f"tokens can hold; shorten it")
        return self.encode(text)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decode: feed ids one at a time, get only the new text, never half a character.

    Each step decodes a short window `ids[prefix:]` and emits what it adds to `ids[prefix:read]`.
    Both decodes drop the window's first leading space the same way, so the pieces concatenate
    to exactly the full decode; a window that ends inside a multi-byte character (byte-fallback
    pieces decode to U+FFFD until complete) waits for the next id.
    """

    def __init__(self, tokenizer: LlamaTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end of generation)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def _check_unicode(text: str) -> None:
    """Refuse a lone surrogate: what undecodable bytes on a command line become (Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(f"the text is not valid UTF-8: character {err.start} is {text[err.start]!r} (bytes "
                             f"that are not UTF-8, e.g. from a file in another encoding); convert it to UTF-8")\
            from None


def _without_dummy_prefix(model: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()
