"""query.py: parsing, weighted combination checked by hand with the encoder's own vectors, filters, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplens.sources.folder import decode_image
from cliplens.errors import CliplensError, QueryError
from cliplens.index import ExactIndex
from cliplens.prompts import load_templates
from cliplens.query import (
    Term,
    Where,
    encode_query,
    parse_query,
    parse_terms,
    parse_where,
    resolve_templates,
    run_query,
    search_words,
    where_mask,
)
from cliplens.search import Searcher
from cliplens.store import IndexStore


@pytest.fixture(scope="module")
def searcher(tiny_index, tiny_encoder):
    return Searcher(encoder=tiny_encoder, store=IndexStore.open(tiny_index))


@pytest.fixture(scope="module")
def field_jpg(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "field.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path, quality=95)
    return path


# --------------------------------------------------------------------------- parsing


def test_parse_combined_cli_words(field_jpg):
    terms = parse_terms(["2:red tractor", "+", str(field_jpg), "-", "snow", "+", "#12", "-", "0.5:id:3"])
    assert terms == (Term("text", "red tractor", 2.0), Term("image", str(field_jpg), 1.0), Term("text", "snow", -1.0),
                     Term("item", 12, 1.0), Term("item", 3, -0.5))


def test_unquoted_words_join_into_one_term():
    assert parse_terms(["red", "tractor", "-", "snow", "storm"]) == (Term("text", "red tractor"),
                                                                    Term("text", "snow storm", -1.0))
    assert parse_terms(["2:red", "tractor"]) == (Term("text", "red tractor", 2.0),)
    assert parse_terms(["-", "snow"]) == (Term("text", "snow", -1.0),)
    assert parse_terms(["text:#1", "+", "t-shirt"]) == (Term("text", "#1"), Term("text", "t-shirt"))


def test_parse_query_string_with_quotes_and_apostrophes():
    assert parse_query('"2:red tractor" - snow + #4') == (Term("text", "red tractor", 2.0), Term("text", "snow", -1.0),
                                                        Term("item", 4))
    assert parse_query("don't panic") == (Term("text", "don't panic"),)


@pytest.mark.parametrize("words,match", [
    (["a", "+", "-", "b"], "two operators"),
    (["a", "+"], "ends with an operator"),
    ([], "empty query"),
    (["0:a"], "non-zero"),
    (["1000:a"], "at most"),
    (["2:"], "empty query"),
    (["   "], "empty query"),
    (["./missing.jpg"], "no image file"),
    (["+".join("a" * 20)], None),
])
def test_parse_errors(words, match):
    if match is None:
        parse_terms(words)  # "a+a+a..." is one word, not operators
        return
    with pytest.raises(QueryError, match=match):
        parse_terms(words)


def test_too_many_terms():
    with pytest.raises(QueryError, match="too many terms"):
        parse_terms(" + ".join(f"w{i}" for i in range(17)).split())


def test_paths_are_refused_where_not_allowed(field_jpg):
    for q in (str(field_jpg), "./x.jpg", "image:foo", "/etc/passwd"):
        with pytest.raises(QueryError, match="not allowed"):
            parse_query(q, allow_paths=False)


def test_resolve_templates():
    assert resolve_templates(None) == ("a photo of a {}.",)
    assert resolve_templates("cifar100") == load_templates("cifar100") and len(resolve_templates("cifar100")) == 18
    assert resolve_templates("a sketch of a {}") == ("a sketch of a {}",)
    with pytest.raises(CliplensError, match="exactly one"):
        resolve_templates("no placeholder")


# --------------------------------------------------------------------------- arithmetic


def test_combined_query_equals_hand_computation(searcher, tiny_encoder, field_jpg):
    terms = parse_terms(["2:red tractor", "+", str(field_jpg), "-", "snow", "+", "0.5:#7"])
    enc = encode_query(terms, store=searcher.store, encode_texts=tiny_encoder.encode_texts,
                       encode_images=tiny_encoder.encode_images)
    t_red = tiny_encoder.encode_texts(["a photo of a red tractor."])[0].astype(np.float64)
    t_snow = tiny_encoder.encode_texts(["a photo of a snow."])[0].astype(np.float64)
    img = tiny_encoder.encode_images([decode_image(field_jpg, max_pixels=10**8)])[0].astype(np.float64)
    item = np.asarray(searcher.store.embeddings[7], np.float64)
    want = 2 * t_red + img - t_snow + 0.5 * item
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(enc.vector, want, atol=1e-6)
    assert enc.prompt == '2*"a photo of a red tractor." + image field.jpg - "a photo of a snow." + 0.5*#7'

    result = run_query(searcher, terms, 10, exclude_query_items=False)
    oracle = ExactIndex(np.asarray(searcher.store.embeddings)).scores(want.astype(np.float32)[None])[0]
    top = np.argsort(-oracle, kind="stable")[:10]
    assert [h.id for h in result.hits] == top.tolist()
    np.testing.assert_allclose([h.score for h in result.hits], oracle[top], atol=1e-5)


def test_a_negative_term_lowers_what_it_names(searcher, tiny_encoder):
    snow = tiny_encoder.encode_texts(["a photo of a snow."])[0]
    plain = encode_query([Term("text", "tractor")], store=searcher.store, encode_texts=tiny_encoder.encode_texts,
                         encode_images=None).vector
    minus = encode_query([Term("text", "tractor"), Term("text", "snow", -1)], store=searcher.store,
                         encode_texts=tiny_encoder.encode_texts, encode_images=None).vector
    assert minus @ snow < plain @ snow
    assert abs(np.linalg.norm(minus) - 1) < 1e-6


def test_template_ensemble_is_normalise_then_average(searcher, tiny_encoder):
    templates = load_templates("cifar100")
    enc = encode_query([Term("text", "tulip")], store=searcher.store, encode_texts=tiny_encoder.encode_texts,
                       encode_images=None, templates=templates)
    vecs = tiny_encoder.encode_texts([t.replace("{}", "tulip") for t in templates]).astype(np.float64)
    want = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(enc.vector, want / np.linalg.norm(want), atol=1e-6)
    assert enc.prompt == '"tulip" x 18 templates'


def test_terms_that_cancel_are_an_error(searcher, tiny_encoder):
    with pytest.raises(QueryError, match="cancel"):
        encode_query([Term("text", "cat"), Term("text", "cat", -1)], store=searcher.store,
                     encode_texts=tiny_encoder.encode_texts, encode_images=None)


def test_unknown_item_is_an_error(searcher, tiny_encoder):
    with pytest.raises(QueryError, match="no item #999999"):
        encode_query([Term("item", 999999)], store=searcher.store, encode_texts=None, encode_images=None)


# --------------------------------------------------------------------------- filters


def test_where_parsing():
    assert parse_where(["label=tulip,rose", "superclass=flowers", "label=seal", "ref=a/*"]) == (
        Where("label", ("tulip", "rose", "seal")), Where("superclass", ("flowers",)), Where("path", ("a/*",)))
    for bad in ("label", "colour=red", "label="):
        with pytest.raises(QueryError):
            parse_where([bad])


def test_where_masks_match_the_columns(searcher):
    store = searcher.store
    names = list(store.class_names)
    mask = where_mask(store, parse_where(["label=tulips,Sweet Pepper"]))
    want = np.isin(store.labels, [names.index("tulip"), names.index("sweet_pepper")])
    np.testing.assert_array_equal(mask, want)
    mask = where_mask(store, parse_where(["superclass=flowers", "label=tulip,tractor"]))
    np.testing.assert_array_equal(mask, store.labels == names.index("tulip"))
    mask = where_mask(store, parse_where([f"path={store.items['ref'][5]}"]))
    assert np.flatnonzero(mask).tolist() == [5]
    assert where_mask(store, ()) is None
    with pytest.raises(QueryError, match="did you mean tulip"):
        where_mask(store, parse_where(["label=tulipz"]))
    with pytest.raises(QueryError, match="no caption"):
        where_mask(store, parse_where(["caption=x"]))


def test_filters_and_min_score_in_a_search(searcher):
    store = searcher.store
    result = run_query(searcher, [Term("text", "tulip")], 50, where=parse_where(["superclass=flowers"]))
    assert len(result.hits) == 10 and {h.superclass for h in result.hits} == {"flowers"}  # 5 classes x 2 images
    assert result.precision_at_k == pytest.approx(0.2)
    full = searcher.search("tulip", 20)
    cut = full.hits[5].score
    result = searcher.search("tulip", 20, min_score=cut)
    assert [h.id for h in result.hits] == [h.id for h in full.hits if h.score >= cut]
    assert result.to_json()["hits"][0].keys() >= {"rank", "id", "score", "label", "superclass"}


def test_similar_excludes_the_item_and_scores_its_class(searcher):
    result = run_query(searcher, [Term("item", 0)], 5)
    assert 0 not in [h.id for h in result.hits]
    own = str(searcher.store.items["label_name"][0]).replace("_", " ")
    assert result.query_class == own and result.precision_at_k is not None
    assert run_query(searcher, [Term("item", 0)], 1, exclude_query_items=False).hits[0].id == 0


def test_search_words_keeps_the_core_path_for_plain_text(searcher):
    a = search_words(searcher, ["tractor"], 5)
    b = searcher.search("tractor", 5)
    assert a.to_json() == b.to_json()


# --------------------------------------------------------------------------- CLI


def test_cli_combined_search_json(tiny_index, field_jpg, capsys):
    from cliplens.cli import main

    argv = ["search", "2:red tractor", "+", str(field_jpg), "-", "snow", "--index-dir", str(tiny_index),
            "-k", "5", "--json", "--where", "superclass=vehicles 1", "--min-score", "-1"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == f"2:red tractor + {field_jpg} - snow"
    assert [t["weight"] for t in out["terms"]] == [2.0, 1.0, -1.0]
    assert out["where"] == ["superclass=vehicles 1"] and out["min_score"] == -1
    assert {h["superclass"] for h in out["hits"]} == {"vehicles 1"} and len(out["hits"]) == 5
    assert main(["search", "--similar", "3", "--index-dir", str(tiny_index), "-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "#3" and 3 not in [h["id"] for h in out["hits"]]
    assert main(["search", "a", "+", "-", "b", "--index-dir", str(tiny_index)]) == 2
    assert "two operators" in capsys.readouterr().err
