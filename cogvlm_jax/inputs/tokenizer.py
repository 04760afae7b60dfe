"""Tokenizers of the two families behind one small interface.

* CogVLM1 uses the Llama-2 sentencepiece model (``tokenizer.model``): BPE with byte fallback, a dummy
  prefix space, and Hugging Face's *legacy* ``LlamaTokenizer`` behaviour. In that mode the special
  token strings (``<s>``, ``</s>``, ``<unk>``) written in the text are matched first, and every piece
  of text between them is handed to sentencepiece on its own (so each gets its own dummy prefix).
  The non-legacy mode (``"legacy": false``) is not reproduced; it differs only for leading spaces
  and for text right after a special token string.
* CogVLM2 uses Llama-3's byte-level BPE (``tokenizer.json``), run by the ``tokenizers`` library, which
  matches added tokens in the text natively.

Both expose ``encode``/``decode``, the special ids, and :class:`StreamDecoder` for printing generated
text token by token. Decoding never applies Hugging Face's ``clean_up_tokenization_spaces`` rewrite
(" ." -> "." and the like): it is lossy and would stop streamed pieces from adding up to the text.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the vocabularies, the first preferred where both are
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # read or carried beside them
REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TokenizerError(ValueError):
    """No usable tokenizer at a path; the message names the path."""


def tokenizer_dir(path: str | os.PathLike | None) -> str | None:
    """Where the tokenizer of the directory ``path`` (a checkpoint's or a tokenizer's) is: ``path`` itself
    if it holds ``tokenizer.model`` or ``tokenizer.json``, else its ``tokenizer/`` subdirectory if that
    does, else None (also for a ``path`` that is None or not a directory)."""
    if path is None:
        return None
    for folder in (os.fspath(path), os.path.join(path, "tokenizer")):
        if any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
            return folder
    return None


def tokenizer_files(path: str | os.PathLike | None) -> list[str]:
    """The files of the tokenizer at ``path``, to copy it: a tokenizer file, or those of the folder
    :func:`tokenizer_dir` finds, with the ``TOKENIZER_CONFIG_FILES`` beside them."""
    if path is not None and os.path.isfile(path):
        folder, names = os.path.dirname(path), (os.path.basename(path),) + TOKENIZER_CONFIG_FILES
    else:
        folder, names = tokenizer_dir(path), TOKENIZER_FILES + TOKENIZER_CONFIG_FILES
    if folder is None:
        return []
    return [p for p in (os.path.join(folder, name) for name in names) if os.path.isfile(p)]


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """A tokenizer from a ``tokenizer.model``/``tokenizer.json`` file or a directory holding one.

    A directory is searched for the files themselves, then for a ``tokenizer/`` subdirectory (the
    layout of a checkpoint folder, see :func:`tokenizer_dir`). ``tokenizer_config.json`` beside the
    file, if present, supplies the bos/eos/pad tokens.
    """
    path = os.fspath(path)
    file = _find_tokenizer_file(path)
    config = _read_tokenizer_config(os.path.join(os.path.dirname(file), "tokenizer_config.json"))
    if file.endswith(".model"):
        return SentencePieceTokenizer(file, config)
    return FastTokenizer(file, config)


def find_tokenizer(path: str | os.PathLike | None) -> "Tokenizer | None":
    """The tokenizer of the directory ``path`` (see :func:`tokenizer_dir`), or None when it has none (or
    ``path`` is None)."""
    folder = tokenizer_dir(path)
    return None if folder is None else load_tokenizer(folder)


def _find_tokenizer_file(path: str) -> str:
    if os.path.isfile(path):
        if os.path.basename(path).endswith((".model", ".json")):
            return path
        raise TokenizerError(f"{path} is not a tokenizer file (expected one of {', '.join(TOKENIZER_FILES)})")
    if os.path.isdir(path):
        folder = tokenizer_dir(path)
        if folder is None:
            raise TokenizerError(
                f"no tokenizer found in {path}: expected {' or '.join(TOKENIZER_FILES)} "
                "in it or in its tokenizer/ subdirectory")
        return next(p for p in (os.path.join(folder, name) for name in TOKENIZER_FILES) if os.path.isfile(p))
    raise TokenizerError(f"tokenizer path {path} does not exist")


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must be a JSON object of tokenizer settings, got a {type(config).__name__}")
    return config


def _token_content(value) -> str | None:
    """A token entry of tokenizer_config.json: a plain string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """What both backends share: the special ids from tokenizer_config.json and streaming."""

    def __init__(self, path: str, config: dict):
        self.path = path
        self.config = config

    # ---------------------------------------------------------------- backend interface
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def decode_continuation(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ``ids`` as they render after some earlier text (for :class:`StreamDecoder`).

        Same as ``decode`` unless the backend renders the start of a text differently.
        """
        return self.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        raise NotImplementedError

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for (the longest piece or special
        token): a text of C characters that the tokenizer keeps takes at least C / this many tokens."""
        raise NotImplementedError

    @property
    def drops_whitespace(self) -> bool:
        """Whether encoding may drop whitespace (a normalizer that collapses runs of spaces)."""
        raise NotImplementedError

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` found without tokenizing, in time linear in the text:
        the characters the tokenizer keeps (all, or all but whitespace) over ``max_token_chars``."""
        kept = sum(map(len, text.split())) if self.drops_whitespace else len(text)
        return -(-kept // self.max_token_chars)

    # ---------------------------------------------------------------- shared
    def _config_token_id(self, key: str) -> int | None:
        """The id of the token tokenizer_config.json names under ``key`` (bos_token, ...), or None."""
        content = _token_content(self.config.get(key))
        if content is None:
            return None
        token_id = self.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"{self.path}: tokenizer_config.json {key} {content!r} is not in the vocabulary")
        return token_id

    @property
    def bos_id(self) -> int | None:
        return self._config_token_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._config_token_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._config_token_id("pad_token")

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """CogVLM1: Llama sentencepiece model, Hugging Face legacy ``LlamaTokenizer`` semantics."""

    def __init__(self, path: str, config: dict | None = None):
        super().__init__(path, config or {})
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {path}: {e}") from None
        # Control symbols (<s>, </s>) and <unk> are the special tokens, as in LlamaTokenizer.
        self._special = frozenset(
            i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i) or self._sp.is_unknown(i))
        self._special_by_text = {self._sp.id_to_piece(i): i for i in self._special}
        if not self.config:  # no tokenizer_config.json: the model's own ids (pad stays unset)
            self.config = {"bos_token": self._piece(self._sp.bos_id()),
                           "eos_token": self._piece(self._sp.eos_id())}
        # A piece that renders as visible text whatever follows it: decoded in front of a window of
        # ids, it keeps sentencepiece from stripping the window's leading spaces (see
        # decode_continuation).
        self._anchor = next(
            i for i in range(self._sp.get_piece_size())
            if i not in self._special and not self._sp.is_byte(i) and not self._sp.is_unused(i)
            and "\u2581" not in self._sp.id_to_piece(i) and self._sp.decode([i]).strip())
        self._anchor_text = self._sp.decode([self._anchor])

    def _piece(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if token_id >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for anything unknown; only <unk> itself really is unk.
        return None if token_id == self._sp.unk_id() and token != self._piece(self._sp.unk_id()) else token_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    @functools.cached_property
    def max_token_chars(self) -> int:
        # A piece is the text it stands for ("\u2581" for a space); a byte-fallback piece (<0x41>) stands for less.
        return max(len(self._sp.id_to_piece(i)) for i in range(self._sp.get_piece_size()))

    @functools.cached_property
    def drops_whitespace(self) -> bool:
        # sentencepiece's remove_extra_whitespaces (on in many models) collapses runs of spaces
        return self._sp.encode("a" + " " * 8 + "a") == self._sp.encode("a a")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.config.get("add_bos_token", True) and self.bos_id is not None:
            ids.append(self.bos_id)
        for chunk, special_id in _split_on_specials(text, self._special_by_text):
            ids.extend([special_id] if special_id is not None else self._sp.encode(chunk))
        if add_special_tokens and self.config.get("add_eos_token", False) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special])
        # Special tokens are written as their text; each run of ordinary pieces between them is
        # decoded by sentencepiece (which drops the dummy prefix space of the run's first piece).
        out, run = [], []
        for i in ids:
            if i in self._special:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def decode_continuation(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece drops every whitespace piece at the start of a text (the dummy prefix and
        # more: decode(["▁", "▁please"]) is "please"); in the middle of a text they are spaces.
        text = self.decode([self._anchor, *ids], skip_special_tokens)
        return text[len(self._anchor_text):]


def _split_on_specials(text: str, specials: dict[str, int]):
    """Yield ``(chunk, None)`` for plain text and ``("", id)`` for each special token string in it.

    Longest match first, empty chunks dropped, no whitespace stripped around the special tokens:
    the behaviour of Hugging Face's added-token trie for LlamaTokenizer.
    """
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    # With a capturing group, re.split alternates text, special, text, ...
    for i, part in enumerate(re.split(f"({pattern})", text)):
        if i % 2:
            yield "", specials[part]
        elif part:
            yield part, None


class FastTokenizer(Tokenizer):
    """CogVLM2: a ``tokenizers`` tokenizer.json (Llama-3 byte-level BPE)."""

    def __init__(self, path: str, config: dict | None = None):
        super().__init__(path, config or {})
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot load tokenizer.json {path}: {e}") from None
        self._special = frozenset(
            token_id for token_id, added in self._tok.get_added_tokens_decoder().items() if added.special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    @functools.cached_property
    def max_token_chars(self) -> int:
        # Byte-level tokens are spelt one character per byte: at least as long as the text they stand for.
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)))

    @functools.cached_property
    def drops_whitespace(self) -> bool:
        return self._tok.normalizer is not None  # none (Llama-3's): every character is kept

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: a long text would stall every
        # other thread, the serving engine's included). A panic of the Rust code (its regex engine gives
        # up on some very long runs of whitespace) is this text's error, not the process's.
        try:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except Exception:
            raise
        except BaseException as e:  # pyo3's PanicException derives from BaseException
            if type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(f"the tokenizer cannot take this text ({len(text)} characters): {e}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenisation: ``add`` one generated id at a time, print what comes back.

    The pieces returned by ``add`` and a final ``flush`` add up to ``decode(all ids)``. Text that
    ends in an incomplete UTF-8 character (a byte-fallback or byte-level token cut the character
    in two) is held back until the character is complete. Each step decodes only a short window,
    the ids from the start of the previously emitted piece on, and returns what the newest ids add
    to it. Only the first window is decoded as the start of a text; later ones go through
    ``decode_continuation``, so their leading spaces print as they do inside the whole text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: first id of the previously emitted piece
        self._read = 0  # ids before this index have been emitted

    def add(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # invisible in the decoded text, so invisible in the window too
        self._ids.append(token_id)
        return self._emit(final=False)

    def extend(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        tok, skip = self.tokenizer, self.skip_special_tokens
        decode = tok.decode if self._prefix == 0 else tok.decode_continuation
        seen = decode(self._ids[self._prefix:self._read], skip)
        text = decode(self._ids[self._prefix:], skip)
        if len(text) <= len(seen) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen):]
