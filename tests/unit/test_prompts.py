"""cliplens.prompts: template sets, files, class names, ensembling, queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from cliplens import prompts as P
from cliplens.errors import CliplensError, QueryError

CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


# ---------------------------------------------------------------------------- built-in sets
def test_template_set_names():
    assert P.TEMPLATE_SETS == ("single", "cifar100", "imagenet80")
    assert P.load_templates("single") == ("a photo of a {}.",)


def test_cifar100_templates_are_openais_18():
    t = P.load_templates("cifar100")
    assert len(t) == 18 and len(set(t)) == 18
    assert t[0] == "a photo of a {}."
    assert t[3] == "a low contrast photo of a {}."
    assert "a black and white photo of the {}." in t
    assert t[-1] == "a photo of the big {}."
    assert all(x.count("{}") == 1 for x in t)


def test_imagenet80_equals_open_clip_list():
    t = P.load_templates("imagenet80")
    assert len(t) == 80 and len(set(t)) == 80
    assert list(t) == [f("{}") for f in OPENAI_IMAGENET_TEMPLATES]
    assert t[0] == "a bad photo of a {}."
    assert "itap of my {}." in t and "a {} in a video game." in t
    assert all(x.count("{}") == 1 for x in t)


# ---------------------------------------------------------------------------- user files
def test_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my templates\n\na sketch of a {}.\n   \n  a {} at night.  \n#not this {}\n")
    assert P.load_templates(str(f)) == ("a sketch of a {}.", "a {} at night.")


def test_json_list_and_dict(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.JSON"
    a.write_text(json.dumps(["a {}.", "the {}!"]))
    b.write_text(json.dumps({"templates": ["x {} y"], "comment": "ignored"}))
    assert P.load_templates(str(a)) == ("a {}.", "the {}!")
    assert P.load_templates(str(b)) == ("x {} y",)


def _one_line_error(spec: str) -> str:
    with pytest.raises(P.PromptError) as info:
        P.load_templates(spec)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, CliplensError)
    return msg


def test_bad_template_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("a photo of a {}.\n\nno placeholder here\n")
    msg = _one_line_error(str(f))
    assert f"{f}:3" in msg and "exactly one {}" in msg
    f.write_text("two {} and {}\n")
    assert f"{f}:1" in _one_line_error(str(f))


def test_bad_json_files(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(["a {}.", "none"]))
    assert "templates[1]" in _one_line_error(str(f))
    f.write_text('["a {}.",\n oops]')
    assert f"{f}:2" in _one_line_error(str(f))
    f.write_text(json.dumps({"other": []}))
    assert "JSON list" in _one_line_error(str(f))
    f.write_text(json.dumps([1]))
    assert "string" in _one_line_error(str(f))


def test_missing_and_empty_files(tmp_path):
    msg = _one_line_error(str(tmp_path / "nope.txt"))
    assert "not found" in msg and "single, cifar100, imagenet80" in msg
    assert "not a file" in _one_line_error(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    assert "no templates" in _one_line_error(str(empty))


# ---------------------------------------------------------------------------- class names, prompts
def test_english_classnames():
    assert P.english_classname("aquarium_fish") == "aquarium fish"
    assert P.english_classname("large_man-made_outdoor_things") == "large man-made outdoor things"
    assert P.english_classname("apple") == "apple"
    assert P.classnames(["lawn_mower", "sweet_pepper"]) == ("lawn mower", "sweet pepper")
    assert P.classnames(["lawn_mower"], style="raw") == ("lawn_mower",)
    with pytest.raises(P.PromptError, match="style"):
        P.classnames(["x"], style="french")


def test_fill_and_class_prompts():
    assert P.fill("a photo of a {}.", "tractor") == "a photo of a tractor."
    assert P.fill("a {} with {braces}", "cat") == "a cat with {braces}"  # replace, not format
    with pytest.raises(P.PromptError):
        P.fill("no placeholder", "cat")
    got = P.class_prompts(["cat", "lawn mower"], ["a {}.", "the {}!"])
    assert got == [["a cat.", "the cat!"], ["a lawn mower.", "the lawn mower!"]]
    with pytest.raises(P.PromptError):
        P.class_prompts(["cat"], [])


# ---------------------------------------------------------------------------- ensembling
def _embeddings() -> np.ndarray:
    """(2 classes, 3 templates, 4 dims) with very different norms per prompt."""
    return np.array(
        [
            [[10.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
            [[1.0, 1, 0, 0], [0, 0, 0, 5], [3, 0, 0, 4]],
        ],
        dtype=np.float32,
    )


def test_ensemble_normalize_first_by_hand():
    got = P.ensemble(_embeddings())
    assert got.dtype == np.float32 and got.shape == (2, 4)
    # class 0: unit vectors e0, e1, e2 -> mean (1,1,1,0)/3 -> (1,1,1,0)/sqrt(3)
    np.testing.assert_allclose(got[0], np.array([1, 1, 1, 0]) / np.sqrt(3), rtol=1e-6)
    # class 1: (1,1,0,0)/sqrt2 + (0,0,0,1) + (0.6,0,0,0.8)
    v = np.array([1 / np.sqrt(2) + 0.6, 1 / np.sqrt(2), 0, 1.8])
    np.testing.assert_allclose(got[1], v / np.linalg.norm(v), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_ensemble_average_first_by_hand_and_differs():
    got = P.ensemble(_embeddings(), order="average-first")
    # class 0: mean (10,1,1,0)/3 -> (10,1,1,0)/sqrt(102): the long prompt dominates
    np.testing.assert_allclose(got[0], np.array([10, 1, 1, 0]) / np.sqrt(102), rtol=1e-6)
    v = np.array([4.0, 1, 0, 9])
    np.testing.assert_allclose(got[1], v / np.linalg.norm(v), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(got, P.ensemble(_embeddings()), atol=1e-2)


def test_ensemble_orders_agree_on_unit_inputs():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((5, 7, 16)).astype(np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    np.testing.assert_allclose(P.ensemble(e), P.ensemble(e, order="average-first"), rtol=1e-5, atol=1e-6)


def test_ensemble_errors():
    with pytest.raises(ValueError, match="shape"):
        P.ensemble(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="zero length"):
        P.ensemble(np.zeros((1, 2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        P.ensemble(np.full((1, 1, 2), np.nan, dtype=np.float32))
    with pytest.raises(P.PromptError, match="order"):
        P.ensemble(_embeddings(), order="median")


# ---------------------------------------------------------------------------- queries
def test_wrap_query():
    assert P.wrap_query("tractor") == "a photo of a tractor."
    assert P.wrap_query("  red tractor ") == "a photo of a red tractor."
    # a sentence is still wrapped; only its trailing full stop goes, so "." is not doubled
    assert P.wrap_query("a red tractor in a field.") == "a photo of a red tractor in a field."
    assert P.wrap_query("The Tractor") == "a photo of a Tractor."
    assert P.wrap_query("an apple", template="{} on a table") == "an apple on a table"
    assert P.wrap_query("a", template="a photo of a {}.") == "a photo of a a."
    assert P.wrap_query("tractor...") == "a photo of a tractor."
    assert P.wrap_query("tractor?") == "a photo of a tractor."
    assert P.wrap_query("  a red tractor in a field. ", raw=True) == "a red tractor in a field."
    assert P.wrap_query("tulip", template="a close-up of a {}") == "a close-up of a tulip"


def test_wrap_query_errors():
    for empty in ("", "   ", "\n\t"):
        with pytest.raises(QueryError, match="^empty query: "):
            P.wrap_query(empty)
        with pytest.raises(QueryError):
            P.wrap_query(empty, raw=True)
    with pytest.raises(P.PromptError, match="exactly one"):
        P.wrap_query("tractor", template="a photo")
    with pytest.raises(P.PromptError):
        P.wrap_query("tractor", template="{} and {}")


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("sweet pepper", "sweet_pepper"),
        ("Sweet-Pepper", "sweet_pepper"),
        ("sweet peppers", "sweet_pepper"),
        ("lawn mower", "lawn_mower"),
        ("lawnmower", "lawn_mower"),
        ("a photo of a tractor.", "tractor"),
        ("tractors", "tractor"),
        ("tulips", "tulip"),
        ("picture of tulips", "tulip"),
        ("The Seal!", "seal"),
        ("seal", "seal"),
        ("an apple", "apple"),
        ("apples", "apple"),
        ("butterflies", "butterfly"),
        ("mice", "mouse"),
        ("women", "woman"),
        ("wolves", "wolf"),
        ("couches", "couch"),
        ("buses", "bus"),
        ("bus", "bus"),
        ("aquarium_fish", "aquarium_fish"),
        ("maple tree", "maple_tree"),
    ],
)
def test_match_class(query, name):
    assert P.match_class(query, CIFAR100_NAMES) == CIFAR100_NAMES.index(name)


@pytest.mark.parametrize("query", ["red tractor", "a tractor in a field", "car", "", "   ", "photo of", "pepper"])
def test_match_class_none(query):
    assert P.match_class(query, CIFAR100_NAMES) is None


def test_match_class_superclass_names():
    supers = ["fruit_and_vegetables", "large_man-made_outdoor_things", "flowers"]
    assert P.match_class("large man-made outdoor things", supers) == 1
    assert P.match_class("Fruit and Vegetables", supers) == 0
    assert P.match_class("flowers", supers) == 2
