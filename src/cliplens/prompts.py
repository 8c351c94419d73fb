"""Prompt templates, class-name variants, prompt ensembling, and reading a user's query.

Zero-shot classification turns each class name into sentences ("a photo of a {}.") and
averages their text embeddings. The built-in template sets are OpenAI's, verbatim:

* ``single``: ``("a photo of a {}.",)``;
* ``cifar100``: the 18 CIFAR-100 templates from openai/CLIP ``data/prompts.md``;
* ``imagenet80``: the 80 ImageNet templates from openai/CLIP
  ``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` (identical, in order, to open_clip's
  ``zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``).

Templates use ``{}`` for the class name and are filled with ``str.replace``, not
``str.format``, so other braces in a user's template are kept literally.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens.errors import CliplensError, QueryError

__all__ = [
    "TEMPLATE_SETS",
    "PromptError",
    "load_templates",
    "english_classname",
    "classnames",
    "fill",
    "class_prompts",
    "ensemble",
    "wrap_query",
    "match_class",
]

TEMPLATE_SETS = ("single", "cifar100", "imagenet80")
_SINGLE = ("a photo of a {}.",)
_PLACEHOLDER = "{}"


class PromptError(CliplensError):
    """A template set, template file or prompt option is unknown or malformed."""


def _check_template(template: object, where: str) -> str:
    """Return `template` if it is a string with exactly one ``{}``; else PromptError."""
    if not isinstance(template, str):
        raise PromptError(f"{where}: a template must be a string, got {type(template).__name__}")
    n = template.count(_PLACEHOLDER)
    if n != 1:
        raise PromptError(f"{where}: template {template!r} must contain exactly one {{}} for the class name, found {n}")
    return template


def _parse_text(text: str, source: str) -> tuple[str, ...]:
    """One template per line; blank lines and lines starting with # are skipped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(_check_template(line, f"{source}:{lineno}"))
    return tuple(out)


def _parse_json(text: str, source: str) -> tuple[str, ...]:
    """A JSON list of strings, or an object with such a list under "templates"."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and "templates" in data:
        data = data["templates"]
    if not isinstance(data, list):
        raise PromptError(f'{source}: expected a JSON list of templates or {{"templates": [...]}}')
    return tuple(_check_template(t, f"{source}: templates[{i}]") for i, t in enumerate(data))


def load_templates(spec: str) -> tuple[str, ...]:
    """Templates for a built-in set name (see TEMPLATE_SETS) or a file path.

    A file is JSON when it ends in ``.json`` (a list of strings, or ``{"templates": [...]}``)
    and plain text otherwise (one template per line; blank and ``#`` lines ignored). Every
    template must contain exactly one ``{}``. Problems raise PromptError with a one-line
    message naming the file and line (or JSON entry).
    """
    if spec == "single":
        return _SINGLE
    if spec in TEMPLATE_SETS:
        text = resources.files("cliplens").joinpath("data", f"templates_{spec}.txt").read_text("utf-8")
        return _parse_text(text, f"<built-in {spec}>")
    path = Path(spec)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise PromptError(
            f"template set or file {what}: {spec!r}; use one of {', '.join(TEMPLATE_SETS)} or a .txt/.json file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read template file ({type(e).__name__})") from None
    templates = _parse_json(text, str(path)) if path.suffix.lower() == ".json" else _parse_text(text, str(path))
    if not templates:
        raise PromptError(f"{path}: no templates in file (one per line, with {{}} for the class name)")
    return templates


# ---------------------------------------------------------------------------- class names
def english_classname(name: str) -> str:
    """Dataset class name as English words: ``"aquarium_fish"`` -> ``"aquarium fish"``.

    Underscores become spaces and runs of whitespace collapse; hyphens stay
    (``"large_man-made_outdoor_things"`` -> ``"large man-made outdoor things"``), because
    OpenAI's prompts use spaces and a text encoder reads words, not identifiers.
    """
    return " ".join(name.replace("_", " ").split())


def classnames(names: Sequence[str], style: str = "english") -> tuple[str, ...]:
    """Class names in a style: ``"english"`` (see english_classname) or ``"raw"`` (as given)."""
    if style == "english":
        return tuple(english_classname(n) for n in names)
    if style == "raw":
        return tuple(names)
    raise PromptError(f"unknown class-name style {style!r}; use 'english' or 'raw'")


def fill(template: str, classname: str) -> str:
    """The prompt for one class: `template` with its ``{}`` replaced by `classname`."""
    return _check_template(template, "template").replace(_PLACEHOLDER, classname)


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Prompts indexed ``[class][template]`` (C lists of T strings), ready to encode."""
    if len(templates) == 0:
        raise PromptError("no templates given; need at least one, e.g. 'a photo of a {}.'")
    checked = [_check_template(t, f"templates[{i}]") for i, t in enumerate(templates)]
    return [[t.replace(_PLACEHOLDER, n) for t in checked] for n in names]


# ---------------------------------------------------------------------------- ensembling
def _unit(x: np.ndarray, what: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(norm > 0):
        raise ValueError(f"cannot L2-normalise {what}: some vectors have zero length")
    return x / norm


def ensemble(embeddings: np.ndarray, *, order: str = "normalize-first") -> np.ndarray:
    """One unit vector per class from the embeddings of its T prompts.

    embeddings: (C, T, D) text embeddings as the encoder returns them (any norm).
    Returns (C, D) float32 unit vectors (computed in float64).

    ``order="normalize-first"`` (default): L2-normalise each prompt embedding, average over
    the T templates, L2-normalise again. This is CLIP's ImageNet notebook, and it is also
    what open_clip does: ``build_zero_shot_classifier`` (open_clip 3.3) calls
    ``encode_text(texts, normalize=True)`` before ``.mean(dim=1)`` and renormalises, and
    ``build_zero_shot_classifier_legacy`` does ``F.normalize(...).mean(dim=0)`` then
    renormalises. Each prompt gets equal weight whatever its raw norm.

    ``order="average-first"``: average the raw embeddings, then L2-normalise; prompts with
    longer raw embeddings weigh more. Kept for comparison; no reference uses it.
    """
    e = np.asarray(embeddings)
    if e.ndim != 3 or 0 in e.shape:
        raise ValueError(f"embeddings must be a non-empty (classes, templates, dim) array, got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.floating) or not np.isfinite(e).all():
        raise ValueError(f"embeddings must be finite floats, got dtype {e.dtype}")
    e = e.astype(np.float64)
    if order == "normalize-first":
        mean = _unit(e, "prompt embeddings").mean(axis=1)
    elif order == "average-first":
        mean = e.mean(axis=1)
    else:
        raise PromptError(f"unknown ensemble order {order!r}; use 'normalize-first' or 'average-first'")
    return _unit(mean, "averaged class embeddings").astype(np.float32)


# ---------------------------------------------------------------------------- queries
def wrap_query(text: str, template: str = "a photo of a {}.", raw: bool = False) -> str:
    """The sentence to encode for a user's text query.

    ``"tractor"`` -> ``"a photo of a tractor."``. CLIP was trained on captions, so a bare
    noun matches images better inside a caption-like template. A query that already reads
    as a sentence ("a red tractor in a field.") is still wrapped, because guessing what is
    a sentence is fragile. Two edits keep the result English: trailing ``.?!`` are dropped, so
    the template's own ending is not doubled, and a leading article is dropped when the template
    already puts one before ``{}`` ("a red tractor" -> "a photo of a red tractor.", not
    "a photo of a a red tractor."). Pass ``raw=True`` to encode the text as typed (stripped).
    """
    stripped = text.strip()
    if not stripped:
        raise QueryError(f"empty query: {text!r}; type some words to search for, e.g. 'tractor'")
    if raw:
        return stripped
    body = stripped.rstrip(".?!").rstrip() or stripped  # a query of only punctuation stays as typed
    template = _check_template(template, "query template")
    if _ARTICLE_BEFORE.search(template.split(_PLACEHOLDER)[0]):
        body = _ARTICLE_START.sub("", body) or body
    return template.replace(_PLACEHOLDER, body)


_ARTICLE_BEFORE = re.compile(r"(?:^|\s)(?:a|an|the)\s+$", re.IGNORECASE)
_ARTICLE_START = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


_LEADING = re.compile(r"^(?:(?:a|an|the)\s+)?(?:(?:photo|picture|image)\s+of\s+)?(?:(?:a|an|the)\s+)?")
_IRREGULAR = {
    "mice": "mouse", "men": "man", "women": "woman", "children": "child", "people": "person",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "wolves": "wolf", "leaves": "leaf",
    "knives": "knife", "shelves": "shelf",
}  # fmt: skip


def _normalise(text: str) -> str:
    """Lower case; ``_``/``-`` as spaces; leading articles and "photo of a" and trailing punctuation dropped."""
    t = " ".join(text.lower().replace("_", " ").replace("-", " ").split())
    t = t.rstrip(".,;:!?'\" ").lstrip("'\" ")
    return _LEADING.sub("", t)


def _singulars(t: str) -> list[str]:
    """`t` and guesses at its singular (only the last word changes)."""
    head, _, last = t.rpartition(" ")
    head = head + " " if head else ""
    guesses = [last]
    if last in _IRREGULAR:
        guesses.append(_IRREGULAR[last])
    if last.endswith("ies") and len(last) > 4:
        guesses.append(last[:-3] + "y")
    if last.endswith("ves"):
        guesses += [last[:-3] + "f", last[:-3] + "fe"]
    if last.endswith("es"):
        guesses.append(last[:-2])
    if last.endswith("s") and not last.endswith("ss"):
        guesses.append(last[:-1])
    return [head + g for g in guesses]


def match_class(query: str, class_names: Sequence[str]) -> int | None:
    """Index of the class a query names, or None.

    Case, underscores, hyphens and spaces do not matter (``"Lawn-Mower"``, ``"lawnmower"``
    and ``"lawn_mower"`` match ``lawn_mower``); a leading article or "a photo of a" /
    "picture of" and trailing punctuation are dropped; a simple English plural of the last
    word is accepted ("tractors", "sweet peppers", "butterflies", "mice"). Anything more
    ("red tractor") is not a class name and gives None. The first exact match wins.
    """
    keys: dict[str, int] = {}
    for i, name in enumerate(class_names):
        keys.setdefault(_normalise(name).replace(" ", ""), i)
    q = _normalise(query)
    if not q:
        return None
    for guess in _singulars(q):
        hit = keys.get(guess.replace(" ", ""))
        if hit is not None:
            return hit
    return None
