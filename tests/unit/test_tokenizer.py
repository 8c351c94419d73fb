"""cliplens.tokenizer.ClipTokenizer gives exactly open_clip's token ids, on a large and hostile corpus."""

from __future__ import annotations

import html
import subprocess
import sys

import numpy as np
import pytest

from cliplens.tokenizer import ClipTokenizer, clean

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " " * 8,
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "\t\n\r\x0b\x0c\x1c\x1d\u00a0\u2028\u3000\u200b",
    "éèêëàâäôöûüçñÉÀßøåæœ", "αβγδεζηθλμπσωΩΣ", "абвгдежзийклмнопрстуфхцчшщъыьэюяЖЩ", "日本語の文字列中文字符漢字한국어",
    "مرحبا بالعالم", "नमस्ते दुनिया", "🚜🌷🦭☎️👍🏽👨‍👩‍👧‍👦🇫🇷❤️‍🔥", "\u0301\u0308\u0327",  # combining marks
    "ﬁﬂＡＢＣ１２３", "“”‘’«»—–…", "Ã©Ã¨â€™â€œ", "\x00\x01\x07\x1b\x7f\x85",
]
_FIXED = [
    "", " ", "   \t\n  ", "a", "A", "a photo of a tractor.", "A PHOTO OF A TRACTOR!", "tractor", "don't", "it's OK'S",
    "I'M HERE, you'll see we'd they've they're", "&amp;", "&amp;amp;", "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;",
    "&#39;quoted&#39; &nbsp;x", "<b>html</b> & more", "<start_of_text>", "<end_of_text> after", "a<end_of_text>b",
    "\x1b[31mred\x1b[0m", "l’été à Paris", "naïve café", "ＦＵＬＬＷＩＤＴＨ", "ﬁsh ﬂow", "mojibake Ã©tÃ©",
    "emoji 🚜🚜🚜 and 👨‍👩‍👧‍👦", "🇫🇷🇩🇪", "12345678901234567890", "3.14159 is π", "e-mail: a.b@c.de", "snake_case_name",
    "CamelCaseName", "x" * 300, "word " * 200, "🚜" * 100, "\u00e9" * 80, "a\u0301 e\u0301",
    "line\r\nbreak\rcarriage", "tab\tseparated\tvalues", "\u2028separator\u2029", "zero\u200bwidth",
]


def _corpus(n: int = 6000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = list(_FIXED)
    for _ in range(n):
        k = int(rng.integers(1, 4))
        alphabet = "".join(_ALPHABETS[int(i)] for i in rng.choice(len(_ALPHABETS), size=k, replace=False))
        length = int(rng.integers(0, 60)) if rng.random() < 0.95 else int(rng.integers(200, 800))
        out.append("".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=length)))
    from cliplens.prompts import load_templates

    words = ["tractor", "tulip", "seal", "telephone", "aquarium fish", "lawn-mower", "maple_tree", "sweet pepper"]
    for spec in ("cifar100", "imagenet80"):
        out += [t.replace("{}", w) for t in load_templates(spec) for w in words]
    return out


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.mark.parametrize("context_length", [77, 16])
def test_same_ids_as_open_clip_on_a_large_corpus(reference, context_length):
    texts = _corpus()
    want = reference(texts, context_length=context_length).numpy()
    got = ClipTokenizer()(texts, context_length=context_length)
    assert got.dtype == np.int64 and got.shape == want.shape == (len(texts), context_length)
    bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
    assert not bad, f"{len(bad)} strings tokenised differently, e.g. {bad[:3]!r}"


def test_truncation_keeps_end_of_text_last(reference):
    ids = ClipTokenizer()(["word " * 200, "short"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == ids[0, 1]).all()
    assert ids[1].tolist()[:3] == [49406, ClipTokenizer().encode("short")[0], 49407] and not ids[1, 3:].any()
    assert ClipTokenizer()([""]).tolist()[0][:3] == [49406, 49407, 0]


def test_vocabulary_tables_equal_open_clip(reference):
    ours = ClipTokenizer()
    ours.encode("x")  # loads the tables
    assert ours._encoder == reference.encoder
    assert ours._ranks == {f"{a} {b}": r for (a, b), r in reference.bpe_ranks.items()}


def test_ascii_shortcut_is_an_identity():
    """Printable ASCII without '&' skips ftfy and html: both must leave such text unchanged."""
    import ftfy
    import regex

    rng = np.random.default_rng(1)
    chars = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    pattern = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                            regex.IGNORECASE)
    from cliplens.tokenizer import _ASCII_PIECES

    for _ in range(3000):
        text = "".join(chars[int(i)] for i in rng.integers(0, len(chars), size=int(rng.integers(0, 80))))
        assert ftfy.fix_text(text) == text and html.unescape(text) == text
        low = clean(text)
        assert _ASCII_PIECES.findall(low) == pattern.findall(low)


def test_tokenizing_imports_neither_torch_nor_open_clip():
    code = ("import sys; from cliplens.tokenizer import ClipTokenizer; t = ClipTokenizer(); "
            "ids = t(['a photo of a tractor.', 'café 🚜 &amp;']); "
            "print(ids[0, :8].tolist(), 'torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("]")
    reference_ids = open_clip_tokenizer.SimpleTokenizer()(["a photo of a tractor."]).numpy()[0, :8].tolist()
    assert out[0] + "]" == str(reference_ids)
    assert out[1].split() == ["False", "False"]


def test_reads_only_the_merges_it_needs_and_refuses_a_short_or_broken_vocabulary(tmp_path):
    import gzip

    from cliplens.errors import ModelError
    from cliplens.tokenizer import _MERGES, _merge_lines, default_vocab_path

    whole = gzip.open(default_vocab_path()).read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    assert _merge_lines(default_vocab_path(), _MERGES) == whole  # the partial read is the same lines
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress("\n".join(["header"] + whole[:10]).encode()))
    assert _merge_lines(short, _MERGES) == whole[:10]  # a file that ends early: all it has
    with pytest.raises(ModelError, match="not CLIP's vocabulary .it has 10 merges"):
        ClipTokenizer(vocab_path=short).encode("tractor")
    broken = tmp_path / "broken.txt.gz"
    raw = bytearray(default_vocab_path().read_bytes()[:200_000])
    raw[5000:5100] = b"\x00" * 100
    broken.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="cannot read the tokenizer vocabulary"):
        ClipTokenizer(vocab_path=broken).encode("tractor")
