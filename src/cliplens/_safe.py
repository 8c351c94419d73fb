"""Small guards for text that comes from outside: JSON nesting, terminal control characters, paths in messages.

- :func:`json_depth` measures how deeply a JSON text nests *before* it is parsed: Python's parser recurses once
  per level and a few kilobytes of ``[[[[...`` raise RecursionError (a crash, not a ValueError).
- :func:`printable` escapes what a terminal would act on (ESC sequences, carriage returns, backspaces, C1
  controls, bidirectional overrides), so a file name cannot recolour, rewrite or hide lines of output.
- :func:`redact_paths` replaces filesystem paths in a message meant for a remote client.
"""

from __future__ import annotations

import re

MAX_JSON_DEPTH = 32  # sidecars and request bodies: CIFAR-free data that nests a few levels at most

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")
# C0 controls, DEL, C1 controls, and the Unicode bidi controls (LRE..RLO, LRI..PDI, LRM/RLM, ALM)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# two or more path components, absolute (or a Windows drive), not one of the server's own routes
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\](?!api/|static/|docs\b|openapi)[^\s'\"<>|]*[/\\][^\s'\"<>|,;)]*")


def json_depth(text: str | bytes) -> int:
    """How deeply arrays and objects nest in ``text`` (0 for a scalar); strings are skipped, nothing is parsed."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def has_control(text: str, *, allow_newlines: bool = True) -> bool:
    """True when ``text`` holds control characters (tabs and newlines allowed unless ``allow_newlines`` is False)."""
    return bool((_CONTROL_KEEP_LINES if allow_newlines else _CONTROL).search(text))


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\r``, ``\\u202e``)."""
    pattern = _CONTROL_KEEP_LINES if keep_newlines else _CONTROL
    return pattern.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def redact_paths(message: str) -> str:
    """``message`` with filesystem paths ("/home/ann/photos/x.jpg", "C:\\data\\x") replaced by ``<path>``."""
    return _PATH.sub("<path>", message)
