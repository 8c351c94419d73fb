"""bench/rclip_ref.py writes ONNX graphs rclip 3.3.0 can load, and they compute what open_clip computes.

The exporter tests need only torch, open_clip and onnxruntime (the tiny stand-in of conftest); the last test runs
rclip itself, offline, and is skipped only where rclip is not installed (no ``rclip`` executable found via
``$CLIPLENS_RCLIP`` or PATH, and not importable here).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import rclip_ref
from bench.standin import StandIn


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return StandIn("tiny", "tiny test CLIP", tiny_model, None)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    return rclip_ref.export(tiny, tmp_path_factory.mktemp("rclip-export"))


@pytest.fixture(scope="module")
def reference(tiny):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(tiny.model, pretrained=tiny.pretrained)
    model.eval()
    return model, transform, open_clip.get_tokenizer(tiny.model)


def _session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_files_are_where_rclip_looks_for_them(exported):
    import open_clip

    assert (exported / rclip_ref.MODEL_SUBDIR / "visual.onnx").is_file()
    assert (exported / rclip_ref.MODEL_SUBDIR / "textual.onnx").is_file()
    # rclip 3.3.0 names: model_download.MODEL_SUBDIR / VISUAL_ONNX / TEXTUAL_ONNX / TOKENIZER_VOCAB
    assert rclip_ref.MODEL_SUBDIR == "ViT-B-32-256-datacomp_s34b_b86k"
    vocab = exported / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(vocab) as ours, gzip.open(open_clip.tokenizer.default_bpe()) as theirs:
        assert ours.read() == theirs.read()


def test_graphs_have_the_names_types_and_shapes_rclip_feeds(exported):
    visual = _session(exported / rclip_ref.MODEL_SUBDIR / "visual.onnx")
    text = _session(exported / rclip_ref.MODEL_SUBDIR / "textual.onnx")
    for sess, dtype, shape in ((visual, "tensor(float)", [3, 256, 256]), (text, "tensor(int64)", [77])):
        (inp,), outs = sess.get_inputs(), sess.get_outputs()
        assert inp.name == "input"  # rclip: session.run(None, {"input": batch})
        assert inp.type == dtype  # float32, not float16: rclip casts only for a float16 input
        assert isinstance(inp.shape[0], str) and inp.shape[1:] == shape  # any batch size
        assert len(outs) == 1 and outs[0].type == "tensor(float)"  # rclip unpacks exactly one output
        assert isinstance(outs[0].shape[0], str) and outs[0].shape[1] == rclip_ref.RCLIP_VECTOR_SIZE


def test_pil_bicubic_matrix_is_pil_resize():
    from PIL import Image

    img = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    m = rclip_ref.pil_bicubic_matrix(256, 224)
    want = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
    np.testing.assert_allclose(m @ img @ m.T, want, atol=1e-5)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_image_graph_matches_open_clip(exported, reference, batch):
    import torch

    model, _, _ = reference
    x = np.random.default_rng(batch).normal(size=(batch, 3, 256, 256)).astype(np.float32)  # normalised pixels
    got = _session(exported / rclip_ref.MODEL_SUBDIR / "visual.onnx").run(None, {"input": x})[0]
    m = rclip_ref.pil_bicubic_matrix(256, 224)
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(m @ x @ m.T)).numpy()
    d = want.shape[1]
    assert got.shape == (batch, 512)
    assert np.abs(got[:, :d] - want).max() <= 1e-4
    assert not got[:, d:].any()  # the tiny model's 32 dims, then zeros: cosines unchanged


def test_text_graph_matches_open_clip(exported, reference):
    import torch

    model, _, tokenizer = reference
    tokens = tokenizer(["a photo of a tractor", "tulip", "two cats sleeping on a red sofa at night"])
    got = _session(exported / rclip_ref.MODEL_SUBDIR / "textual.onnx").run(None, {"input": tokens.numpy()})[0]
    with torch.no_grad():
        want = model.encode_text(tokens).numpy()
    assert np.abs(got[:, : want.shape[1]] - want).max() <= 1e-4


def test_export_is_cached_by_the_weights(tiny, exported):
    onnx = exported / rclip_ref.MODEL_SUBDIR / "visual.onnx"
    before = onnx.stat().st_mtime_ns
    assert rclip_ref.export(tiny, exported.parent) == exported
    assert onnx.stat().st_mtime_ns == before


def test_argv_runs_in_the_folder_and_env_is_offline(tmp_path, exported):
    fake = tmp_path / "bin" / "rclip"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\npwd\nprintf '%s\\n' \"$*\"\n")
    fake.chmod(0o755)
    folder = tmp_path / "my photos"
    folder.mkdir()
    env = rclip_ref.rclip_env(tmp_path / "work", exported)
    assert env["HF_HUB_OFFLINE"] == "1" and "PYTHONPATH" not in env
    data = Path(env["RCLIP_DATADIR"])
    assert (data / rclip_ref.MODEL_SUBDIR / "visual.onnx").is_file()
    assert (data / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    out = subprocess.run(rclip_ref.query_argv(folder, "red car", rclip=str(fake)), env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == [str(folder), "-n -t 10 red car"]
    idx = rclip_ref.index_argv(folder, "red car", rclip=str(fake))
    assert "-n" not in idx and idx[-3:] == ["-t", "10", "red car"]


def _rclip_executable() -> str:
    try:
        return rclip_ref.find_rclip()
    except FileNotFoundError:
        pytest.importorskip("rclip", reason="rclip is not installed (set CLIPLENS_RCLIP to its executable)")
    exe = Path(sys.executable).parent / "rclip"
    if not exe.is_file():
        pytest.fail(f"rclip is importable but {exe} does not exist")
    return str(exe)


@pytest.mark.slow
def test_rclip_indexes_and_queries_offline_with_the_export(tmp_path, exported, reference):
    import torch
    from PIL import Image

    rclip = _rclip_executable()
    model, transform, tokenizer = reference
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        path = folder / f"p{i}.jpg"
        Image.fromarray(field).resize((320, 240) if i % 2 else (240, 320), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    env = rclip_ref.rclip_env(tmp_path / "work", exported)
    subprocess.run(rclip_ref.index_argv(folder, "tractor", rclip=rclip), env=env, check=True, capture_output=True)
    stored = rclip_ref.read_vectors(env)
    assert sorted(stored) == sorted(str(p.resolve()) for p in paths)
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            model.encode_image(torch.stack([transform(Image.open(p)) for p in paths])), dim=-1).numpy()
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(["tractor"])), dim=-1).numpy()[0]
    got = np.stack([stored[str(p.resolve())] for p in paths])[:, : want.shape[1]]
    cos = np.einsum("ij,ij->i", got, want)
    assert cos.min() >= 0.999, cos  # the only difference: rclip's 256 px preprocessing, then the graph's resize

    subprocess.run(rclip_ref.index_argv(folder, "tractor", rclip=rclip), env=env, check=True, capture_output=True)
    assert rclip_ref.read_vectors(env).keys() == stored.keys()  # the unchanged folder: nothing re-indexed
    out = subprocess.run(rclip_ref.query_argv(folder, "tractor", rclip=rclip), env=env, check=True,
                         capture_output=True, text=True).stdout
    ranked = rclip_ref.parse_results(out)
    # rclip's order is that of its own vectors against open_clip's text embedding (its tokenizer and text graph agree)
    assert [p for _, p in ranked] == [str(paths[i].resolve()) for i in np.argsort(-(got @ text))]
    assert not any((tmp_path / "work" / "rclip-hf").iterdir())  # nothing was downloaded into the hub cache
    assert os.environ.get("RCLIP_DATADIR") is None  # the test's own environment is untouched
