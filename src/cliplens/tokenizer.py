"""CLIP's byte-pair tokenizer in plain Python: open_clip's ``SimpleTokenizer`` without torch or open_clip.

The text-only search path (:mod:`cliplens.textonly`) must not import torch (about a second) or open_clip (about
another), but must feed the text tower exactly the ids open_clip would. This is a port of open_clip's
``tokenizer.py`` (itself OpenAI's CLIP tokenizer, MIT licence) with the same vocabulary file, read from the
installed open_clip package without importing it, and the same steps in the same order:

1. clean ("lower", open_clip's default for CLIP models): ``ftfy.fix_text``, ``html.unescape`` twice, strip,
   whitespace runs to one space, lower case;
2. split with the same pattern (``regex``'s ``\\p{L}``/``\\p{N}`` classes; the special tokens first);
3. each piece's UTF-8 bytes mapped to printable characters, then merged by BPE rank;
4. ``[start_of_text] + ids + [end_of_text]``, cut to the context length with end-of-text kept last, zero-padded.

Two shortcuts keep a one-shot query fast, both identities proven by tests (tests/unit/test_tokenizer.py, against
open_clip itself on a large corpus): text that is printable ASCII without ``&`` skips ftfy and ``html`` (both
leave it unchanged) and is split with the standard library's ``re`` (for ASCII the two patterns match the same
pieces), so ftfy (~0.15 s to import) and ``regex`` load only for other text; and the vocabulary's dictionaries are
keyed by the file's own lines ("a b" strings) instead of tuples, which builds them in half the time.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import re
import zlib
from pathlib import Path

import numpy as np

from cliplens.errors import ModelError

CONTEXT_LENGTH = 77  # every CLIP model's
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES = 49152 - 256 - 2  # merge lines used (open_clip: merges[1:49152-256-2+1])
SPECIAL = ("<start_of_text>", "<end_of_text>")
_PIECES = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII except '&': ftfy and html.unescape keep it as is
_ASCII_PIECES = re.compile("|".join(SPECIAL) + r"|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)


def default_vocab_path() -> Path:
    """open_clip's own vocabulary file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the CLIP tokenizer's vocabulary comes with open_clip: pip install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character (open_clip's table: printable Latin-1 bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML entities (twice), whitespace runs to one space, lower case."""
    if _PLAIN.fullmatch(text):
        return " ".join(text.split()).lower()
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


@functools.lru_cache()
def _unicode_pieces():
    import regex

    return regex.compile("|".join(SPECIAL) + "|" + _PIECES, regex.IGNORECASE)


def _merge_lines(path: Path, count: int) -> list[str]:
    """Lines 1..count of the gzip file ``path`` (line 0 is its header): only as much of the stream is decompressed
    as they need (about a fifth of the file: CLIP uses 48,894 of its 262,144 merges), which halves a one-shot
    query's tokenizer start-up."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    data, newlines, complete = bytearray(), 0, False
    with open(path, "rb") as f:
        while newlines <= count:
            chunk = f.read(1 << 16)
            if not chunk:
                data += inflate.flush()
                complete = True
                break
            piece = inflate.decompress(chunk)
            newlines += piece.count(b"\n")
            data += piece
    if not complete:  # whole lines only (a chunk may end inside a character); there are more than ``count``
        del data[data.rfind(b"\n"):]
    return data.decode("utf-8").split("\n")[1 : count + 1]


class ClipTokenizer:
    """Strings -> int64 (N, context_length) token ids, as open_clip's ``SimpleTokenizer`` (clean="lower")."""

    def __init__(self, *, vocab_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        self.context_length = int(context_length)
        self._ranks: dict[str, int] | None = None
        self._encoder: dict[str, int] | None = None
        self._cache: dict[str, str] = {t: t for t in SPECIAL}
        self._bytes = bytes_to_unicode()
        self.sot_token_id, self.eot_token_id = 49406, 49407  # checked against the file in _load

    def _load(self) -> None:
        try:
            lines = _merge_lines(self.vocab_path, _MERGES)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            raise ModelError(f"cannot read the tokenizer vocabulary {self.vocab_path} ({exc}); "
                             "reinstall open_clip_torch") from None
        if len(lines) < _MERGES:
            raise ModelError(f"{self.vocab_path} is not CLIP's vocabulary (it has {len(lines)} merges, not "
                             f"{_MERGES}); reinstall open_clip_torch")
        self._ranks = dict(zip(lines, range(len(lines))))  # "a b" -> rank: the pair (a, b) as the file writes it
        chars = list(self._bytes.values())
        vocab = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines] + list(SPECIAL)
        self._encoder = dict(zip(vocab, range(len(vocab))))
        if (self._encoder[SPECIAL[0]], self._encoder[SPECIAL[1]]) != (self.sot_token_id, self.eot_token_id):
            raise ModelError(f"{self.vocab_path} is not CLIP's vocabulary (special token ids differ)")

    def bpe(self, token: str) -> str:
        """The BPE merges of one piece, as space-separated vocabulary entries (open_clip's ``bpe``)."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        ranks = self._ranks
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return token + "</w>"
        while True:
            pairs = {f"{a} {b}" for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best.split(" ")
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end-of-text."""
        if self._encoder is None:
            self._load()
        text = clean(text)
        pieces = _ASCII_PIECES.findall(text) if text.isascii() else _unicode_pieces().findall(text)
        ids: list[int] = []
        for piece in pieces:
            mapped = "".join(self._bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[t] for t in self.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """int64 (N, context_length): start, ids, end, zeros; a long text is cut and keeps end-of-text last."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
